"""Atomic saves and preemption, proven with real processes.

* kill -9 at random moments inside saves, synchronous and asynchronous (a forked saver, killed
  several times): ``latest`` always names a complete, self-consistent checkpoint and keep_last
  holds;
* SIGUSR1 / SIGTERM to ``python -m longpo_megatron.train``: exit code 0, a message naming the
  checkpoint, and the next job resumes from it to the same final state (model and optimizer,
  bitwise) as an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longpo_megatron import checkpoint

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LONGPO_ROOT=str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    if time.monotonic() > deadline:
        proc.kill()
        raise AssertionError("subprocess timed out")
    line = proc.stdout.readline()
    if not line and proc.poll() is not None:
        raise AssertionError(f"subprocess exited ({proc.returncode}) early")
    return line


def _assert_consistent(root: Path) -> int:
    """``latest`` resolves; every tensor equals the saved step; returns that step."""
    ckpt = checkpoint.resolve(root)
    step = checkpoint.read_common(ckpt)["train_state"]["step"]
    assert ckpt.name == checkpoint.iter_dir_name(step)
    tensors = checkpoint.read_tensors(ckpt)
    assert any(k.startswith("optimizer.") for k in tensors)
    for key, t in tensors.items():
        assert torch.all(t == step), f"{ckpt}: {key} is not all {step}"
    return step


def _kill_mid_save(proc, deadline: float, rng: random.Random, durations: list[float]) -> bool:
    """Let 1-3 saves of a fresh child finish (timing them), SIGKILL it at a random moment of the
    next one; True when the kill landed before that save printed ``saved``."""
    child = int(re.match(r"child (\d+)", _readline(proc, deadline)).group(1))
    for _ in range(rng.randint(1, 3)):
        assert _readline(proc, deadline).startswith("begin")
        saved = _readline(proc, deadline).split()
        assert saved[0] == "saved"
        durations.append(float(saved[2]))
    assert _readline(proc, deadline).startswith("begin")
    time.sleep(rng.uniform(0, sorted(durations)[len(durations) // 2]))
    os.kill(child, signal.SIGKILL)
    mid_save = True
    while not (line := _readline(proc, deadline)).startswith(f"child {child} ended"):
        mid_save = mid_save and not line.startswith("saved")
    return mid_save


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_save_never_breaks_latest(tmp_path, mode):
    root, kills = tmp_path / "ckpt", 6
    saver = str(ROOT / "tests/checkpoint_saver.py")
    cmd = [sys.executable, saver, str(root), str(kills + 1), "3", mode]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env()
    )
    deadline, rng = time.monotonic() + 130, random.Random(0)
    durations: list[float] = []
    seen, mid_save = [], 0
    try:
        for _ in range(kills):
            mid_save += _kill_mid_save(proc, deadline, rng, durations)
            seen.append(_assert_consistent(root))
        rest = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert mid_save >= 1, "no kill landed inside a save"
    assert seen == sorted(seen), seen
    final = _assert_consistent(root)
    assert checkpoint.complete_steps(root) == [final - 1, final]  # keep_last=2
    assert not [p for p in root.iterdir() if p.name.endswith((".tmp", ".del"))]
    print(
        f"{mid_save}/{kills} kills inside a save; saves took {min(durations):.3f}-"
        f"{max(durations):.3f} s; checkpoints after each kill: {seen}"
    )


# ---- preemption --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("preempt") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _train_cmd(data: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "longpo_megatron.train", "parallel.engine=cpu",
        f"data.path={data}", f"train.train_iters={STEPS}", "train.global_batch_size=2",
        "optim.lr=1e-3", "optim.weight_decay=0.1", f"checkpoint.save={root}",
        f"logging.output_dir={out}", "logging.tensorboard=false", *extra,
    ]  # fmt: skip


def _run(cmd: list[str], timeout: float = 90) -> str:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory) -> Path:
    """The same run without interruption: its final checkpoint."""
    tmp = tmp_path_factory.mktemp("whole")
    _run(_train_cmd(small_data, tmp / "ckpt", tmp / "out"))
    return checkpoint.resolve(tmp / "ckpt")


def _same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint.read_tensors(a), checkpoint.read_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs"
    ca, cb = checkpoint.read_common(a), checkpoint.read_common(b)
    assert ca["train_state"] == cb["train_state"]
    assert torch.equal(ca["reference_table"], cb["reference_table"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_saves_exits_cleanly_and_resumes(sig, small_data, uninterrupted, tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    proc = subprocess.Popen(
        _train_cmd(small_data, root, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=_env(), cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    try:
        while not _readline(proc, deadline).startswith("step      1 |"):
            pass
        proc.send_signal(sig)
        rest = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, rest[-3000:]
    m = re.search(rf"preempted \({sig.name}\) at step (\d+): saved checkpoint (\S+); exiting", rest)
    assert m, rest[-3000:]
    step, saved = int(m.group(1)), Path(m.group(2))
    assert 1 <= step < STEPS and saved == checkpoint.resolve(root)
    assert checkpoint.read_common(saved)["train_state"]["step"] == step

    resumed = _run(_train_cmd(small_data, root, out, f"checkpoint.load={root}"))
    assert f"resumed from {saved} (training checkpoint): step {step}" in resumed
    final = checkpoint.resolve(root)
    assert final.name == checkpoint.iter_dir_name(STEPS)
    _same_checkpoint(final, uninterrupted)


def test_clear_leftovers_removes_torn_latest_tmp_files(tmp_path):
    """A kill while `latest` was being replaced leaves `.latest.<pid>.tmp`; the next save clears
    it (and torn iter dirs) but keeps complete checkpoints and `latest`."""
    from longpo_megatron.checkpoint import paths

    (tmp_path / ".latest.4242.tmp").write_text("iter_0000003")
    (tmp_path / "iter_0000004.tmp").mkdir()
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest").write_text("iter_0000002")
    paths.clear_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest"]
