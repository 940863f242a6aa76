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


def quiet_exit_code(failures: dict) -> Optional[int]:
    """The code to exit with quietly when every failed worker exited with a quiet code."""
    codes = {f.exitcode for f in failures.values()}
    if not codes or not codes <= set(QUIET_EXIT_CODES):
        return None
    return USER_ERROR_EXIT_CODE if USER_ERROR_EXIT_CODE in codes else REQUEUE_EXIT_CODE


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
