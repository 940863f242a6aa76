"""``python -m longpo_megatron.launch`` (torchrun with quiet endings) and ranks that die with it.

Each case launches 2 light workers (tests/launch_worker.py, no torch import) and checks what a
user sees: the exit code and stderr. The orphan case kills the launcher with SIGKILL and waits
(bounded) for every rank to be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "launch_worker.py"
pytestmark = pytest.mark.distributed


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)  # the launcher must set it (no torchrun warning)
    return env


def _cmd(mode: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "longpo_megatron.launch", "--nproc-per-node", "2",
        str(WORKER), mode, str(out),
    ]  # fmt: skip


def _launch(mode: str, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(mode, out), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _wait_ready(out: Path, proc: subprocess.Popen, n: int = 2, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = sorted(out.glob("ready.*"))
        if len(ready) == n:
            return [int(p.read_text()) for p in ready]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"workers not ready after {timeout} s")


def test_user_error_is_one_line_and_exit_2(tmp_path):
    res = _launch("user_error", tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "error: data.path='/x/pairs.jsonl', line 3: a user mistake", res.stderr
    assert lines == [lines[0]], res.stderr  # once, not per rank, and nothing else
    assert "OMP_NUM_THREADS" not in res.stdout


@pytest.mark.slow
def test_requeue_code_passes_through_quietly(tmp_path):
    res = _launch("requeue", tmp_path)
    assert res.returncode == 3, res.stderr
    assert res.stderr == "", res.stderr


@pytest.mark.slow
def test_real_bug_keeps_its_traceback(tmp_path):
    res = _launch("bug", tmp_path)
    assert res.returncode == 1, res.stderr
    assert "RuntimeError: a real bug" in res.stderr
    assert "ChildFailedError" in res.stderr  # torchrun's own report, unchanged


def test_sigterm_to_launcher_ends_quietly_with_the_workers_code(tmp_path):
    proc = subprocess.Popen(
        _cmd("sigterm", tmp_path), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_ready(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.count("saved and stopped") == 2, out
    assert "Traceback" not in err and "SignalException" not in err, err


def test_kill_9_of_the_launcher_leaves_no_orphan_rank(tmp_path):
    proc = subprocess.Popen(
        _cmd("orphan", tmp_path), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pids = _wait_ready(tmp_path, proc)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for p in alive:  # clean up before failing
        os.kill(p, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their launcher"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_CHILD = """
import sys, time
import longpo_megatron.process as p
p._set_pdeathsig = lambda sig: False  # the non-Linux path: the watchdog thread
assert p.die_with_parent(force=True, period_s=0.05) == "watchdog"
print("ready", flush=True)
time.sleep(60)
"""
_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
"""


def test_watchdog_kills_the_orphan_where_prctl_is_unavailable():
    res = subprocess.run(
        [sys.executable, "-c", _PARENT, _CHILD], env=_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.strip())
    deadline = time.monotonic() + 20
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the watchdog did not kill the orphan")


@pytest.mark.slow
def test_train_user_error_under_the_launcher_is_one_line(tmp_path):
    """The real trainer on 2 ranks: a bad record is one line, exit 2, no torchrun report."""
    import json

    line = (ROOT / "data" / "toy" / "preference.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    rec["turns"][0]["chosen"] = "The \ud800 answer"
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    cmd = [
        sys.executable, "-m", "longpo_megatron.launch", "--nproc-per-node", "2",
        "-m", "longpo_megatron.train", "parallel=dp2",
        f"data.path={data}", f"logging.output_dir={tmp_path}/run", "logging.tensorboard=false",
    ]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines[0] == (
        f"error: {data}, line 1, record 'toy-0001': field 'turns[0].chosen': not encodable as "
        "UTF-8 (lone surrogate at 4) [invalid_utf8]"
    ), res.stderr[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
