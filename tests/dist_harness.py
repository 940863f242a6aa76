"""Multi-process test harness: run a function on N local ranks (gloo-friendly, CPU).

``run_distributed(fn, world_size, timeout_s=240, **kwargs)`` spawns ``world_size`` processes
(multiprocessing ``spawn`` context). Each process sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
``WORLD_SIZE``/``LOCAL_RANK``, calls ``torch.set_num_threads(1)``, arms
``faulthandler.dump_traceback_later(..., exit=True)`` and calls ``fn(rank, world_size,
**kwargs)``. ``fn`` must be a top-level importable function and its result picklable; results
come back through files in a temp dir, in rank order.

The parent waits with ONE overall deadline. If any rank fails (non-zero exit, exception,
missing result) or the deadline passes, every rank (and its process group, so grandchildren
too) is killed and reaped, and an ``AssertionError`` is raised that carries each failed rank's
traceback and the tail of its captured stdout/stderr. No zombie processes are left behind.

``fn`` is responsible for ``torch.distributed.init_process_group`` (:func:`init_gloo` is a
convenience); the harness destroys a still-initialized default group when ``fn`` returns.
"""

from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_distributed", "init_gloo", "free_port"]

_POLL_S = 0.05
_GRACE_S = 5.0  # parent deadline = child faulthandler deadline + this
_TAIL_CHARS = 6000
_TRACEBACK_CHARS = 12000


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo(timeout_s: float = 120.0) -> None:
    """``init_process_group('gloo')`` from the env vars the harness sets (call inside ``fn``)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout_s),
        )


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    workdir: str,
    deadline_wall: float,
    kwargs: dict[str, Any],
) -> None:
    """Child entry point: capture output, set env, run ``fn``, write result or traceback."""
    try:
        os.setpgrp()  # own process group, so the parent can kill grandchildren too
    except OSError:
        pass
    wd = Path(workdir)
    log = open(wd / f"rank{rank}.log", "ab", buffering=0)  # kept open until os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    code = 1
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            OMP_NUM_THREADS="1",
        )
        faulthandler.enable(file=sys.stderr, all_threads=True)
        faulthandler.dump_traceback_later(
            max(1.0, deadline_wall - time.time()), exit=True, file=sys.stderr
        )
        import torch

        torch.set_num_threads(1)
        result = fn(rank, world_size, **kwargs)
        tmp = wd / f"rank{rank}.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, wd / f"rank{rank}.pkl")
        code = 0
    except BaseException:  # report everything, SystemExit and KeyboardInterrupt included
        tb = traceback.format_exc()
        try:
            (wd / f"rank{rank}.err").write_text(tb)
            sys.stderr.write(tb)
        except Exception:
            pass
    finally:
        try:
            import torch.distributed as dist

            if code == 0 and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        faulthandler.cancel_dump_traceback_later()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _kill(proc: mp.process.BaseProcess, done: set[int]) -> None:
    """SIGKILL a rank and its process group (best effort, once per rank), then reap it."""
    if proc.pid is None or id(proc) in done:
        return
    done.add(id(proc))
    # The rank made itself leader of group <pid> (setpgrp). Kill the whole group: this also
    # reaches grandchildren that outlive a rank stopped by faulthandler. The number <pid> stays
    # reserved while any group member lives, and Linux allocates pids cyclically, so an empty
    # group gives ESRCH rather than hitting an unrelated process.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if proc.is_alive():
        try:
            proc.kill()
        except OSError:
            pass
    proc.join(timeout=30)


def _tail(path: Path, n: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-n:].decode("utf-8", errors="replace")
    return ("...[truncated]...\n" + text) if len(data) > n else text


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_distributed(
    fn: Callable[..., Any], world_size: int, timeout_s: float = 240, **kwargs: Any
) -> list[Any]:
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` spawned ranks; results by rank.

    Raises ``AssertionError`` (with per-rank tracebacks / output tails) if any rank fails or
    the whole run exceeds ``timeout_s`` seconds.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        raise ValueError(f"fn must be a top-level importable function, got {fn!r}")
    ctx = mp.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix="dist_harness_"))
    port = free_port()
    start = time.time()
    deadline_wall = start + float(timeout_s)
    hard_deadline = time.monotonic() + float(timeout_s) + _GRACE_S
    procs: list[mp.process.BaseProcess] = []
    failure: str | None = None
    killed_by_us: set[int] = set()
    handled: set[int] = set()
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, str(workdir), deadline_wall, kwargs),
                name=f"dist_harness-rank{rank}",
                daemon=False,  # ranks may start their own children (data workers)
            )
            p.start()
            procs.append(p)
        while True:
            codes = [p.exitcode for p in procs]
            bad = [r for r, c in enumerate(codes) if c is not None and c != 0]
            if bad:
                failure = f"rank(s) {bad} failed"
                if time.time() >= deadline_wall - 1.0:
                    failure = (
                        f"timeout after {time.time() - start:.1f}s (limit {timeout_s}s): "
                        + failure
                        + " (faulthandler stops ranks at the deadline; see their stacks below)"
                    )
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > hard_deadline:
                failure = f"timeout after {time.time() - start:.1f}s (limit {timeout_s}s)"
                break
            time.sleep(_POLL_S)
        if failure is not None:
            time.sleep(0.2)  # let ranks that are failing at the same moment finish writing
            for r, p in enumerate(procs):
                if p.exitcode is None:
                    killed_by_us.add(r)
                _kill(p, handled)
            raise AssertionError(_failure_report(failure, procs, workdir, killed_by_us))
        results: list[Any] = []
        for r in range(world_size):
            path = workdir / f"rank{r}.pkl"
            if not path.exists():
                raise AssertionError(
                    f"rank {r} exited 0 without a result\n"
                    + _failure_report("missing result", procs, workdir, killed_by_us)
                )
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        for p in procs:
            _kill(p, handled)
            try:
                p.close()
            except ValueError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


def _failure_report(
    headline: str, procs: list[mp.process.BaseProcess], workdir: Path, killed_by_us: set[int]
) -> str:
    """Human-readable report: per rank status, traceback, and output tail."""
    lines = [f"distributed run failed: {headline} (world_size={len(procs)})"]
    errs = sorted(
        (path.stat().st_mtime_ns, r)
        for r in range(len(procs))
        if (path := workdir / f"rank{r}.err").exists()
    )
    if errs:
        lines.append(f"first rank to raise: rank {errs[0][1]} (likely the root cause)")
    for r, p in enumerate(procs):
        status = (
            "killed by harness (still running)" if r in killed_by_us else _describe_exit(p.exitcode)
        )
        lines.append(f"\n===== rank {r}: {status} =====")
        err = workdir / f"rank{r}.err"
        if err.exists():
            lines.append("--- traceback ---")
            lines.append(_tail(err, _TRACEBACK_CHARS).rstrip())
        tail = _tail(workdir / f"rank{r}.log", _TAIL_CHARS).rstrip()
        if tail:
            lines.append("--- stdout/stderr tail ---")
            lines.append(tail)
    return "\n".join(lines)
