"""``longpo-datagen`` killed with SIGKILL and rerun ends with the same files as a run that was
never interrupted: with the scripted plug-in backend (killed inside a chosen-stage batch) and
with the real ``hf`` backend (killed from outside at whatever point it has reached)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dg_helpers import ROOT, SHARD0, SMALL, compose_cfg, digest, rows, small_corpus

from longpo_megatron.datagen.cli import run as datagen_run

HERE = Path(__file__).resolve().parent
FILES = ("documents", "instructions", "chosen", "rejected", "records")


def cli(out: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m longpo_megatron.datagen.cli`` in a subprocess."""
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "LONGPO_ROOT": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "longpo_megatron.datagen.cli", f"output_dir={out}", *overrides]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


SCRIPTED = ["backend.name=scripted_backend:make", "backend.model=scripted", *SMALL]


def test_sigkill_inside_a_stage_then_resume(tmp_path: Path) -> None:
    finish(cli(tmp_path / "full", *SCRIPTED))
    # Generate calls: 7 for instructions, then chosen; the 10th call is inside chosen.
    killed = cli(
        tmp_path / "run", *SCRIPTED, "--shard", "0/1", env={"LONGPO_TEST_KILL_AFTER": "10"}
    )
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    shard = tmp_path / "run" / SHARD0
    assert len(rows(shard / "chosen.jsonl")) == 16 and not (shard / "rejected.jsonl").exists()
    log = finish(cli(tmp_path / "run", *SCRIPTED))
    assert "chosen: resuming, 16 of" in log
    for name in FILES:
        assert digest(shard / f"{name}.jsonl") == digest(
            tmp_path / "full" / SHARD0 / f"{name}.jsonl"
        ), name


def test_hf_killed_from_outside_then_resumed(tiny_model: Path, tmp_path: Path) -> None:
    docs = small_corpus(tmp_path / "docs")
    args = [
        f"backend.model={tiny_model}",
        f"input.paths=[{docs}]",
        "stage=instructions",
        "backend.batch_size=2",
        "chunking.min_tokens=150",
        "chunking.max_tokens=300",
        "instructions.sampling.max_new_tokens=64",
        "instructions.sampling.temperature=1.5",  # longer answers: time to kill it mid-stage
        "progress=false",
    ]
    full, run = tmp_path / "full", tmp_path / "run"
    for out in (full, run):  # chunking needs only the tokenizer: do it here
        datagen_run(compose_cfg([f"output_dir={out}", *args[:2], "stage=chunk", *args[3:]]))
    finish(cli(full, *args))
    proc = cli(run, *args)
    target = run / SHARD0 / "instructions.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and target.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    done = target.read_bytes().count(b"\n")  # complete lines; the kill may have torn the last
    total = len(rows(full / SHARD0 / "instructions.jsonl"))
    assert 2 <= done < total
    log = finish(cli(run, *args))
    assert "resuming" in log
    assert digest(target) == digest(full / SHARD0 / "instructions.jsonl")
