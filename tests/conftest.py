"""Shared fixtures: a 1-rank gloo group for single-process tests of rank-aware code."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LONGPO_ROOT", str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank_group():
    """A world of one gloo rank (the WORLD group), for code that takes process groups.

    Initialised on demand (in-process trainer runs destroy the default group when they close),
    through an explicit TCP address so no MASTER_PORT is left in this process's environment for
    the subprocesses of later tests to collide with."""
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    yield dist.group.WORLD


DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""Variables an in-process run sets (``distributed.init_process_group``) and children inherit."""


@pytest.fixture(autouse=True)
def _restore_dist_env():
    """Undo a test's changes to the rendezvous variables, so a later test's subprocess does not
    inherit a port this process still listens on (or a RANK that makes it a torchrun worker)."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
