"""The training app's Hydra ergonomics: ``--help`` lists real options only, and multirun jobs
each get their own output directory (no shared metrics.jsonl)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from longpo_megatron.config import GROUPS
from longpo_megatron.config_help import group_options

ROOT = Path(__file__).resolve().parent.parent


def _train(*args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longpo_megatron.train", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout,
    )  # fmt: skip


def test_help_lists_real_groups_options_and_keys_only():
    out = _train("--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "_schema" not in text and "datagen" not in text
    for group, options in group_options().items():
        assert f"  {group}: {', '.join(options)}" in text
    assert set(group_options()) == set(GROUPS) | {"experiment"}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            assert f"  {group}.{f.name} (" in text, f"{group}.{f.name} missing from --help"
    assert "model.rope_scaling (str = none): RoPE frequency scaling" in text


@pytest.mark.slow
def test_multirun_jobs_get_their_own_output_dir(tmp_path: Path):
    base = tmp_path / "runs"
    out = _train(
        "-m", "train.train_iters=1", "longpo.beta=0.1,0.2", f"hydra.sweep.dir={tmp_path}/sweep",
        f"logging.output_dir=${{longpo_job_dir:{base}}}", "logging.tensorboard=false",
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    dirs = sorted(base.iterdir())
    assert [d.name.split("-")[0] for d in dirs] == ["0", "1"]
    for d in dirs:
        lines = (d / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(ln)["step"] for ln in lines if '"step"' in ln]
        assert steps == [1], f"{d}: {steps}"  # one job's steps only
