"""Run the demo's stages as separate processes: one helper, logs per stage, progress, timing.

Every stage of ``longpo-demo run`` is an existing entry point of the project (``longpo-datagen``,
``longpo-preprocess``, the converters, the trainer under :mod:`longpo_megatron.launch`,
``longpo-eval``) started with ``python -m`` / ``python tools/...``. :class:`StageRunner` starts
one or several commands of a stage at once (the machine has two cores: two datagen shards or two
evaluations run side by side), writes each one's output to ``<out>/logs/<stage>[-i].log``, prints
a heartbeat with the latest progress line while they run, and times the stage. A command that
fails stops the others and the demo with one ``error: ...`` line (exit code 2) that carries the
stage's own ``error:`` line when it printed one, else the log to read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from longpo_megatron.errors import UserError

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
TAIL_BYTES = 8192
"""How much of a log's end is read for the heartbeat and for the error line."""


class StageError(UserError, RuntimeError):
    """A stage of the demo failed; the message names the stage, its exit code and its log."""


def stage_env() -> dict[str, str]:
    """Environment of every stage: this checkout importable, one thread per process, no
    network for transformers (every model is local)."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.setdefault("LONGPO_ROOT", str(REPO_ROOT))
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"  # progress reaches the log (and the heartbeat) as it happens
    return env


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def python_script(script: str, *args: str) -> list[str]:
    """``python <repo>/<script> args...`` with this interpreter (the repo's tools/)."""
    return [sys.executable, str(REPO_ROOT / script), *args]


def last_line(path: Path) -> str:
    """The last non-empty line of a log (tqdm's carriage-return updates count as lines)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    return lines[-1] if lines else ""


def error_line(path: Path) -> str:
    """The last ``error: ...`` line a failed stage printed ("" when it printed none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return errors[-1][len("error:") :].strip() if errors else ""


@dataclass
class StageRunner:
    """Runs and times the demo's stages; ``times`` maps stage name -> wall seconds."""

    log_dir: Path
    """Where each command's output goes (``<stage>.log`` or ``<stage>-<i>.log``)."""
    total: int
    """Number of stages (for the ``[i/total]`` progress prefix)."""
    heartbeat_s: float = 30.0
    """Seconds between progress lines while a stage runs."""
    times: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=stage_env)

    def _begin(self, name: str, what: str) -> float:
        print(f"[{len(self.times) + 1}/{self.total}] {name}: {what}", flush=True)
        return time.monotonic()

    def _end(self, name: str, start: float) -> float:
        seconds = time.monotonic() - start
        self.times[name] = round(seconds, 1)
        print(f"      {name} done in {seconds:.1f} s", flush=True)
        return seconds

    def call(self, name: str, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a small in-process stage (writing the documents, the report) and time it."""
        start = self._begin(name, what)
        result = fn(*args)
        self._end(name, start)
        return result

    def run(self, name: str, what: str, commands: Sequence[Sequence[str]]) -> float:
        """Run ``commands`` side by side, wait for all; a failure stops the rest and raises."""
        start = self._begin(name, what)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logs = [
            self.log_dir / (f"{name}.log" if len(commands) == 1 else f"{name}-{i}.log")
            for i in range(len(commands))
        ]
        procs = []
        for cmd, log in zip(commands, logs):
            with open(log, "w", encoding="utf-8") as f:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                procs.append(
                    subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
                )
        try:
            self._wait(name, procs, logs, start)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait()
        return self._end(name, start)

    def _wait(self, name: str, procs: list, logs: list[Path], start: float) -> None:
        next_beat = start + self.heartbeat_s
        while any(p.poll() is None for p in procs):
            for p, log in zip(procs, logs):
                if p.poll() not in (None, 0):
                    self._fail(name, p.returncode, log)
            if time.monotonic() >= next_beat:
                next_beat += self.heartbeat_s
                for log in logs:
                    line = last_line(log)[:110]
                    print(f"      {time.monotonic() - start:5.0f} s  {line}", flush=True)
            time.sleep(0.2)
        for p, log in zip(procs, logs):
            if p.returncode != 0:
                self._fail(name, p.returncode, log)

    @staticmethod
    def _fail(name: str, code: int, log: Path) -> None:
        said = error_line(log)
        detail = said if said else f"exit code {code}; see the end of {log}"
        raise StageError(f"demo stage {name!r} failed: {detail} (log: {log})")
