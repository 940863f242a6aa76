"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends before a kill) -> save and stop cleanly.

The handler only records the signal. At each step boundary the trainer calls
:meth:`PreemptionHandler.requested`, which all-reduces the flag (MAX) over the world so every
rank agrees on the same step, then saves a checkpoint and returns from the loop (exit code 0).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that request a save-and-stop."""


class PreemptionHandler:
    """Records the first preemption signal; restores the previous handlers on :meth:`uninstall`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: Optional[int] = None
        """The first signal number received (None: none yet)."""
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
        flag = 1 if self.received is not None else 0
        if not dist.is_initialized():
            return bool(flag)
        device = "cpu"
        if dist.get_backend(group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())
