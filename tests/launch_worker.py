"""A rank for the launcher tests (no torch import: workers start fast).

    python tests/launch_worker.py MODE DIR

MODE: user_error | requeue | bug | sigterm (wait for SIGTERM, then "save" and exit 0) |
orphan (die with the parent, then sleep). Ready ranks write ``DIR/ready.<rank>`` with their pid.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from longpo_megatron.errors import REQUEUE_EXIT_CODE, UserError, report_user_errors
from longpo_megatron.process import die_with_parent


def _ready(out: Path) -> None:
    tmp = out / f".ready.{os.environ['RANK']}"
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f"ready.{os.environ['RANK']}")


@report_user_errors
def main(mode: str, out: Path) -> int:
    if mode == "user_error":
        raise UserError("data.path='/x/pairs.jsonl', line 3: a user mistake")
    if mode == "requeue":
        return REQUEUE_EXIT_CODE
    if mode == "bug":
        raise RuntimeError("a real bug")
    if mode == "sigterm":
        got: list[int] = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        _ready(out)
        while not got:
            time.sleep(0.05)
        print(f"rank {os.environ['RANK']}: saved and stopped", flush=True)
        return 0
    if mode == "orphan":
        die_with_parent()
        _ready(out)
        while True:
            time.sleep(1)
    raise ValueError(mode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
