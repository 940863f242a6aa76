"""Runs that survive the cluster, proven with real ``python -m longpo_megatron.train`` processes.

* A fake Slurm job whose end time is near (``SLURM_JOB_END_TIME``) and slow steps
  (``LONGPO_TEST_STEP_DELAY_S``): the run stops at a step boundary, saves, exits with
  ``REQUEUE_EXIT_CODE``; a SIGUSR1 that lands during the requeued job's setup stops it cleanly
  (exit 0, nothing trained, ``latest`` untouched); the next job resumes and finishes with the
  same per-step losses as an uninterrupted run, and ``metrics.jsonl`` holds every step once
  (an entry the stopped job would have left past its checkpoint is dropped, and said).
* The pieces in isolation: the stop estimate, the minute interval, the agreement all-reduce.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longpo_megatron import checkpoint
from longpo_megatron.errors import REQUEUE_EXIT_CODE
from longpo_megatron.metrics import drop_entries_after
from longpo_megatron.preemption import (
    JOB_END_ENV,
    STEP_DELAY_ENV,
    PreemptionHandler,
    SaveClock,
    TimeLimit,
    job_end_time,
)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.pop(JOB_END_ENV, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LONGPO_ROOT=str(ROOT), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _cmd(data: str, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "longpo_megatron.train", "parallel.engine=cpu",
        f"data.path={data}", f"train.train_iters={STEPS}", "train.global_batch_size=2",
        "optim.lr=1e-3", f"checkpoint.save={ckpt}", f"logging.output_dir={out}",
        "logging.tensorboard=false", *extra,
    ]  # fmt: skip


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _losses(out: Path) -> dict[int, float]:
    """step -> loss of ``metrics.jsonl``; asserts no step appears twice."""
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {e["step"]: e["loss"] for e in entries}


def _handler_installed(pid: int, sig: int) -> bool:
    """Whether process ``pid`` catches ``sig`` (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def _signal_during_setup(cmd: list[str], sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` as soon as its handler is installed (setup has not finished:
    the model is not even built yet), wait for the exit."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while not _handler_installed(proc.pid, sig):
            assert proc.poll() is None and time.monotonic() < deadline, "handler never installed"
            time.sleep(0.005)
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_time_limit_stop_requeue_code_signal_in_setup_and_exact_resume(tmp_path):
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:4]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    whole = tmp_path / "whole"
    done = _run(_cmd(str(data), whole, whole / "ckpt"), _env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = _losses(whole)
    assert sorted(expected) == list(range(1, STEPS + 1))

    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    # the job ends 60 s after launch; 45 s margin, 2 s steps: stop ~13 s in, long before step 8
    env = _env(**{JOB_END_ENV: str(int(time.time()) + 60), STEP_DELAY_ENV: "2"})
    # and a save every 0.01 minutes: at every boundary (measured saves enter the estimate)
    extra = ("train.exit_margin_minutes=0.75", "checkpoint.save_interval_minutes=0.01")
    stopped = _run(_cmd(str(data), out, ckpt, *extra), env)
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    m = re.search(r"time limit: .* at step (\d+): saved checkpoint (\S+); exiting \(code 3\)",
                  stopped.stdout)  # fmt: skip
    assert m, stopped.stdout[-3000:]
    step = int(m.group(1))
    assert 1 <= step < STEPS and Path(m.group(2)) == checkpoint.resolve(ckpt)
    assert checkpoint.read_common(checkpoint.resolve(ckpt))["train_state"]["step"] == step
    saves = re.findall(r"^saved checkpoint ", stopped.stdout, re.MULTILINE)
    assert len(saves) == step  # one per boundary, the stop's included

    # a job killed after logging step+1 but before saving it would leave this line behind
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step + 1, "loss": -1.0}) + "\n")

    resume = _cmd(str(data), out, ckpt, f"checkpoint.load={ckpt}")
    interrupted = _signal_during_setup(resume, signal.SIGUSR1)
    assert interrupted.returncode == 0, interrupted.stdout[-3000:]
    assert re.search(r"preempted \(SIGUSR1\) while .*nothing saved; exiting", interrupted.stdout)
    assert "step      " not in interrupted.stdout  # no training step ran
    assert checkpoint.resolve(ckpt).name == checkpoint.iter_dir_name(step)

    # the last leg saves asynchronously: the published checkpoints are the same
    finished = _run([*resume, "checkpoint.async_save=true", "checkpoint.save_interval=2"], _env())
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "writing in the background" in finished.stdout
    assert f"dropped 1 entries past step {step} (steps {step + 1}-{step + 1})" in finished.stdout
    assert _losses(out) == expected  # every step once, bitwise the uninterrupted losses
    final, reference = checkpoint.resolve(ckpt), checkpoint.resolve(whole / "ckpt")
    assert final.name == checkpoint.iter_dir_name(STEPS)
    a, b = checkpoint.read_tensors(final), checkpoint.read_tensors(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = sorted((out / "logs").iterdir())  # one log file per start
    assert [p.name for p in logs] == ["run-000.log", "run-001.log", "run-002.log"]
    assert "time limit" in logs[0].read_text() and "while" in logs[1].read_text()
    assert f"step      {STEPS} |" in logs[2].read_text() and (out / "config.yaml").is_file()


def test_time_limit_estimate():
    limit = TimeLimit(deadline=1000.0, margin_s=10.0)
    assert not limit.should_stop(now=999.0)  # no step measured yet: nothing to estimate from
    for seconds in (3.0, 5.0, 4.0):
        limit.record_step(seconds)
    limit.record_save(2.0)
    assert limit.needed_s == 5.0 + 2.0 + 10.0  # slowest recent step + save + margin
    assert not limit.should_stop(now=1000.0 - 17.0)
    assert limit.should_stop(now=1000.0 - 16.9)
    assert not TimeLimit(None, 10.0).should_stop()


def test_time_limit_from_config_takes_the_earlier_deadline():
    env = {JOB_END_ENV: "5000"}
    assert TimeLimit.from_config(None, 1.0, 100.0, env).deadline == 5000.0
    assert TimeLimit.from_config(10.0, 1.0, 100.0, env).deadline == 700.0
    assert TimeLimit.from_config(100.0, 1.0, 100.0, env).deadline == 5000.0
    assert TimeLimit.from_config(None, 1.0, 100.0, {}).deadline is None
    assert job_end_time({JOB_END_ENV: "0"}) is None
    with pytest.raises(ValueError, match=JOB_END_ENV):
        job_end_time({JOB_END_ENV: "soon"})


def test_save_clock():
    clock = SaveClock(2.0, now=0.0)
    assert not clock.due(now=119.0) and clock.due(now=120.0)
    clock.saved(now=120.0)
    assert not clock.due(now=200.0)
    assert not SaveClock(0.0, now=0.0).due(now=1e9)


def test_poll_agrees_over_the_world(single_rank_group):
    handler = PreemptionHandler()
    decision = handler.poll(single_rank_group, time_limit=True, save_due=False)
    assert decision.time_limit and decision.stop and not decision.signal
    handler.received = signal.SIGUSR1
    assert handler.poll(single_rank_group).signal and handler.requested(single_rank_group)


def test_drop_entries_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (1, 2, 3, 4)))
    assert drop_entries_after(str(path), 2) == [3, 4]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert drop_entries_after(str(path), 2) == []
    assert drop_entries_after(str(tmp_path / "absent.jsonl"), 0) == []
