"""Ranks die with their launcher: no orphan keeps training (and saving) after ``kill -9``.

A rank started by torchrun (or :mod:`longpo_megatron.launch`) is a child of the launcher. If the
launcher is killed with SIGKILL it cannot stop its children, which then train on as orphans and
keep writing checkpoints. :func:`die_with_parent` makes the kernel send SIGKILL to this process
when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the
parent pid. A crashed launcher leaves at worst a ``*.tmp`` save, which no loader accepts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
"""``prctl`` option: signal delivered to this process when its parent thread exits."""
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
"""Environment variables that mark a process started by a launcher."""
WATCH_PERIOD_S = 0.5


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` through libc; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, period_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(period_s)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(force: bool = False, period_s: float = WATCH_PERIOD_S) -> str:
    """Arrange for this process to be killed when its parent dies; returns the mechanism.

    Only under a launcher (``LOCAL_RANK`` / ``TORCHELASTIC_RUN_ID`` set) unless ``force``: a
    process started from a shell keeps the shell's semantics. Returns ``"prctl"``,
    ``"watchdog"`` or ``"none"``.
    """
    if not force and not any(k in os.environ for k in LAUNCHER_ENV):
        return "none"
    parent = os.getppid()  # (pid 1 can be a real launcher: a container's entry point)
    if _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died between getppid() and prctl()
            os.kill(os.getpid(), signal.SIGKILL)
        return "prctl"
    threading.Thread(
        target=_watch_parent, args=(parent, period_s), name="parent-watchdog", daemon=True
    ).start()
    return "watchdog"


FALLBACK_WARNINGS = (
    r"(Transformer Engine and Apex are|Apex is) not installed",
    r"full scope is deprecated",
)
"""megatron-core's notes on CPU machines (it falls back to torch kernels) and its deprecation
note on a default it sets itself: nothing a user can act on."""


def silence_fallback_warnings() -> None:
    """Hide megatron's "not installed, falling back" notes so that a user error is the first
    line an entry point prints (call before megatron is imported)."""
    import warnings

    for message in FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
