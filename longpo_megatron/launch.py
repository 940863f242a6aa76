"""``python -m longpo_megatron.launch``: torchrun, with quiet exits for user errors and scancel.

Same command line as torchrun (it IS ``torch.distributed.run``: its parser and its ``run``)::

    python -m longpo_megatron.launch --nproc-per-node 2 -m longpo_megatron.train parallel=tp2

Differences, all about how a run ends:

* workers that exit with :data:`~longpo_megatron.errors.USER_ERROR_EXIT_CODE` (they already
  printed one ``error:`` line) or :data:`~longpo_megatron.errors.REQUEUE_EXIT_CODE` make the
  launcher exit with that code and print nothing more (no ``ChildFailedError`` report);
* SIGTERM to the launcher (what ``scancel`` and Slurm's time limit reach) is forwarded to the
  workers, which save and stop at the next step boundary; the launcher keeps waiting and exits
  with their code (0 after a clean save, 3 for a requeue) instead of a ``SignalException``
  traceback;
* ``OMP_NUM_THREADS`` defaults to 1 so torchrun's warning line does not precede the error line.

Anything else (a crashed rank, a signal death) is reported exactly as torchrun reports it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Optional

from longpo_megatron.errors import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE

QUIET_EXIT_CODES = (USER_ERROR_EXIT_CODE, REQUEUE_EXIT_CODE)
"""Worker exit codes the launcher passes on without a failure report."""
FORWARDED = ("SIGTERM",)
"""Signals the launcher forwards to its workers instead of shutting them down itself."""


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGKILL)
"""How the agent stops the other workers once one has exited (their exit codes are -signal)."""


def quiet_exit_code(failures: dict) -> Optional[int]:
    """The code to exit with quietly, or None for a real failure (torchrun's report).

    Quiet when the first worker to fail exited with a quiet code and every other failed worker
    either did too or was stopped by the agent's shutdown (SIGTERM / SIGKILL).
    """
    if not failures:
        return None
    first = min(failures.values(), key=lambda f: f.timestamp)
    stopped = {-int(s) for s in SHUTDOWN_SIGNALS}
    if first.exitcode not in QUIET_EXIT_CODES:
        return None
    if any(f.exitcode not in QUIET_EXIT_CODES + tuple(stopped) for f in failures.values()):
        return None
    codes = {f.exitcode for f in failures.values()}
    return USER_ERROR_EXIT_CODE if USER_ERROR_EXIT_CODE in codes else REQUEUE_EXIT_CODE


class _QuietFailureLog(logging.Filter):
    """Drops torch elastic's "failed (exitcode: 2|3)" line (the worker already said why) and its
    "Sending process N closing signal" lines (a real failure's report lists those exits)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        text = record.getMessage()
        if text.startswith("Sending process ") and " closing signal " in text:
            return False
        return not any(text.startswith(f"failed (exitcode: {c})") for c in QUIET_EXIT_CODES)


def _forward(signum: int, frame: Optional[FrameType]) -> None:
    """Pass the signal to every worker; the agent keeps monitoring them until they exit."""
    import psutil

    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.Error:
            pass


def _without_forwarded(signals: str) -> str:
    return ",".join(s for s in signals.split(",") if s.strip() and s.strip() not in FORWARDED)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse torchrun's arguments and run torchrun; exit as the module docstring says."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    args.signals_to_handle = _without_forwarded(args.signals_to_handle)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietFailureLog())
    for name in FORWARDED:
        signal.signal(getattr(signal, name), _forward)

    @record
    def launch() -> None:
        try:
            torchrun.run(args)
        except ChildFailedError as e:
            code = quiet_exit_code(e.failures)
            if code is None:
                raise
            raise SystemExit(code) from None

    launch()


if __name__ == "__main__":
    main()
