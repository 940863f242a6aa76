"""User errors: one exception base class and one way every entry point reports them.

A user's mistake (a bad config key, a broken record, a wrong path) is a :class:`UserError`. Every
entry point wraps its body in :func:`report_user_errors`, which prints the message as ONE line
``error: ...`` on stderr, once per launch (the first rank that saw it), and exits with code 2.
Other ranks exit quietly with the same code. Anything that is not a ``UserError`` is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
"""Exit status of a process stopped by a user error (argparse's convention)."""

REQUEUE_EXIT_CODE = 3
"""Exit status of a run that stopped cleanly before its time limit, saved, and wants to be
requeued (the Slurm launcher turns it into ``scontrol requeue``)."""


class UserError(Exception):
    """A mistake in the user's input: the message names the file/record/key and the rule broken."""


def _launch_key() -> str | None:
    """An id shared by the ranks of one launch on this node, or None for a plain process."""
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    parts = (
        str(os.getppid()),
        os.environ.get("TORCHELASTIC_RUN_ID", ""),
        os.environ.get("MASTER_PORT", ""),
        os.environ.get("SLURM_JOB_ID", ""),
    )
    return "-".join(p.replace(os.sep, "_") for p in parts)


def _first_to_report() -> bool:
    """True for exactly one process of a launch (per node): the first to claim the marker."""
    key = _launch_key()
    if key is None:
        return True
    marker = os.path.join(tempfile.gettempdir(), f"longpo-error-{key}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return False
    except OSError:
        return os.environ.get("RANK", "0") == "0"
    os.close(fd)
    return True


def one_line(message: str) -> str:
    """The message folded onto one line (user errors are read in logs, line by line)."""
    return " ".join(str(message).split())


def report_and_exit(err: BaseException) -> None:
    """Print ``error: <message>`` once per launch and exit with :data:`USER_ERROR_EXIT_CODE`."""
    if _first_to_report():
        sys.stdout.flush()
        print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT_CODE)


def report_user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for entry points: a :class:`UserError` becomes one ``error:`` line and exit 2.

    Put it INSIDE ``@hydra.main`` (on the task function) so Hydra's own "Error executing job"
    report never sees the exception: ``SystemExit`` passes through Hydra untouched.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            report_and_exit(err)
            raise AssertionError("unreachable") from None

    return wrapper
