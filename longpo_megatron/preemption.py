"""Stopping cleanly: preemption signals, the job's time limit, and time-based save intervals.

* **Signals.** SIGTERM / SIGUSR1 (what Slurm and torchrun send before a kill) only record a flag.
  The handler is installed at process start (``longpo_megatron.train`` does it before any data or
  reference work), so a signal during setup is not lost: setup stops at its next phase boundary
  (:class:`StopRequested`) and the run resumes later from its last checkpoint.
* **Time limit.** :class:`TimeLimit` knows the deadline (``train.exit_duration_minutes`` after
  process start and/or ``SLURM_JOB_END_TIME``) and, at each step boundary, whether one more step
  would leave less than a save plus a margin: estimate = the slowest recent step + the last
  measured save + ``train.exit_margin_minutes``. The run then saves and exits with
  :data:`~longpo_megatron.errors.REQUEUE_EXIT_CODE`, which the Slurm templates requeue.
* **Agreement.** :meth:`PreemptionHandler.poll` all-reduces (MAX) ``[signal, time limit, save
  due]`` over the world at every step boundary, so every rank stops or saves at the same step.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Optional

import torch
import torch.distributed as dist

from longpo_megatron.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that request a save-and-stop."""
JOB_END_ENV = "SLURM_JOB_END_TIME"
"""Slurm's job end time (Unix seconds), set in the job environment by Slurm >= 21.08."""
STEP_DELAY_ENV = "LONGPO_TEST_STEP_DELAY_S"
"""Test aid: seconds every training step sleeps (simulates slow steps; never set it in runs)."""


class StopRequested(Exception):
    """Raised by setup when a preemption signal arrived before training started."""


class EnvironmentSettingError(UserError, ValueError):
    """An environment variable this module reads holds something it cannot use."""


def step_delay_s(env: Mapping[str, str] = os.environ) -> float:
    """The test-only per-step delay (:data:`STEP_DELAY_ENV`), 0 when unset."""
    value = env.get(STEP_DELAY_ENV, "")
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        raise EnvironmentSettingError(
            f"{STEP_DELAY_ENV}={value!r}: must be a number of seconds"
        ) from None


def _device_for(group: Optional[dist.ProcessGroup]) -> str:
    if dist.get_backend(group) == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


@dataclass(frozen=True)
class StopDecision:
    """What every rank agreed on at one step boundary."""

    signal: bool = False
    """Some rank received SIGTERM / SIGUSR1."""
    time_limit: bool = False
    """Some rank found that one more step would not leave time for a save."""
    save_due: bool = False
    """``checkpoint.save_interval_minutes`` elapsed since the last save (on some rank)."""

    @property
    def stop(self) -> bool:
        """The run must save and stop at this boundary."""
        return self.signal or self.time_limit


class PreemptionHandler:
    """Records the first preemption signal; restores the previous handlers on :meth:`uninstall`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: Optional[int] = None
        """The first signal number received (None: none yet)."""
        self.started_at = time.time()
        """Wall-clock time of construction (process start when built by the entry point)."""
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionHandler:
        """Install the handlers (a no-op outside the main thread, where Python forbids it)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back whatever handlers were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        """Name of the received signal (for messages after :meth:`requested` said True)."""
        if self.received is None:
            return "signal on another rank"
        return signal.Signals(self.received).name

    def requested(self, group: Optional[dist.ProcessGroup] = None) -> bool:
        """True on every rank when any rank of ``group`` (default: world) got a signal.

        Collective when torch.distributed is initialised: all ranks call it at the same step.
        """
        return self.poll(group).signal

    def poll(
        self,
        group: Optional[dist.ProcessGroup] = None,
        time_limit: bool = False,
        save_due: bool = False,
    ) -> StopDecision:
        """The step-boundary decision, agreed by every rank of ``group`` (one MAX all-reduce).

        Collective when torch.distributed is initialised: all ranks call it at the same step.
        """
        flags = [int(self.received is not None), int(time_limit), int(save_due)]
        if dist.is_initialized():
            t = torch.tensor(flags, dtype=torch.int32, device=_device_for(group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flags = [int(v) for v in t.tolist()]
        return StopDecision(*(bool(v) for v in flags))


def job_end_time(env: Mapping[str, str] = os.environ) -> Optional[float]:
    """``SLURM_JOB_END_TIME`` as Unix seconds, or None when unset (or 0: no limit)."""
    value = env.get(JOB_END_ENV, "").strip()
    if not value:
        return None
    try:
        end = float(value)
    except ValueError:
        raise EnvironmentSettingError(f"{JOB_END_ENV}={value!r}: expected Unix seconds") from None
    return end if end > 0 else None


class TimeLimit:
    """The deadline of this launch and whether the next step still fits before it.

    ``needed_s`` = the slowest of the last ``window`` steps + the last measured save + the margin.
    Before any save has been measured the margin alone must cover one (documented in
    ``train.exit_margin_minutes``).
    """

    def __init__(self, deadline: Optional[float], margin_s: float, window: int = 5) -> None:
        self.deadline = deadline
        """Wall-clock time (Unix seconds) by which the run must have saved; None: no limit."""
        self.margin_s = margin_s
        self.steps: deque[float] = deque(maxlen=window)
        self.save_s = 0.0
        """Duration of the last complete save (written to disk, not just scheduled)."""

    @classmethod
    def from_config(
        cls,
        exit_duration_minutes: Optional[float],
        margin_minutes: float,
        started_at: float,
        env: Mapping[str, str] = os.environ,
    ) -> TimeLimit:
        """The earlier of ``started_at + exit_duration_minutes`` and ``SLURM_JOB_END_TIME``."""
        ends = [job_end_time(env)]
        if exit_duration_minutes is not None:
            ends.append(started_at + 60.0 * exit_duration_minutes)
        known = [e for e in ends if e is not None]
        return cls(min(known) if known else None, 60.0 * margin_minutes)

    def record_step(self, seconds: float) -> None:
        """Record one step's wall time (data, forward/backward, optimizer, logging)."""
        self.steps.append(seconds)

    def record_save(self, seconds: float) -> None:
        """Record how long a complete save took."""
        self.save_s = seconds

    @property
    def needed_s(self) -> float:
        """Seconds one more step plus a save plus the margin take."""
        return (max(self.steps) if self.steps else 0.0) + self.save_s + self.margin_s

    def remaining_s(self, now: Optional[float] = None) -> float:
        """Seconds to the deadline (inf without one)."""
        if self.deadline is None:
            return math.inf
        return self.deadline - (time.time() if now is None else now)

    def should_stop(self, now: Optional[float] = None) -> bool:
        """True when one more step would leave less than a save plus the margin."""
        return bool(self.steps) and self.remaining_s(now) < self.needed_s


class SaveClock:
    """``checkpoint.save_interval_minutes``: is a time-based save due?"""

    def __init__(self, interval_minutes: float, now: Optional[float] = None) -> None:
        self.interval_s = 60.0 * interval_minutes
        self.last = time.time() if now is None else now

    def due(self, now: Optional[float] = None) -> bool:
        """True when the interval (> 0) has elapsed since the last save (or the start)."""
        now = time.time() if now is None else now
        return self.interval_s > 0 and now - self.last >= self.interval_s

    def saved(self, now: Optional[float] = None) -> None:
        """Restart the interval (a save just happened)."""
        self.last = time.time() if now is None else now
