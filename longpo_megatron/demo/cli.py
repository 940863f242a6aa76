"""``longpo-demo``: the README's demo (``bash scripts/demo.sh``) and the recipe of its model.

    longpo-demo run [--quick] [--out-dir outputs/demo] [--overwrite]  # the whole loop, CPU, offline
    longpo-demo pretrain ...                                       # rebuild data/demo-model

``run`` is :func:`longpo_megatron.demo.loop.run_demo` (docs/demo.md "The loop"); ``pretrain`` is
``longpo_megatron.demo.pretrain.main`` (docs/demo.md "The starting model"). A user error is one
``error: ...`` line and exit code 2, as everywhere in the project.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Optional

from longpo_megatron.demo.loop import DemoConfig, DemoError, run_demo
from longpo_megatron.errors import report_user_errors


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors (one ``error:`` line, exit 2)."""

    def error(self, message: str):  # noqa: D102
        raise DemoError(f"{self.prog}: {message} (see {self.prog} --help)")


def _doc(name: str) -> str:
    """The DemoConfig field's docstring, used as the flag's help (one source of truth)."""
    from longpo_megatron.config_help import field_docs

    return field_docs(DemoConfig).get(name, "")


def run_parser() -> argparse.ArgumentParser:
    """Flags of ``longpo-demo run``: one per DemoConfig field."""
    p = _Parser(prog="longpo-demo run", description="The whole LongPO loop on one CPU machine.")
    defaults = DemoConfig()
    for f in fields(DemoConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=_doc(f.name))
        elif f.name == "train_overrides":
            p.add_argument(flag, nargs="*", default=[], metavar="KEY=VALUE", help=_doc(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split("[")[-1].rstrip("]"), str)
            p.add_argument(flag, type=kind, default=default, help=_doc(f.name))
    return p


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: ``longpo-demo run|pretrain ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[1])
        return 0
    command, rest = args[0], args[1:]
    if command == "pretrain":
        from longpo_megatron.demo import pretrain

        return pretrain.main(rest) or 0
    if command != "run":
        raise DemoError(f"longpo-demo: unknown command {command!r} (run | pretrain)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ns = run_parser().parse_args(rest)
    run_demo(DemoConfig(**vars(ns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
