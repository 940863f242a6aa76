"""Where a converter may write: one policy for both directions, checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from longpo_megatron.export.arch import ConversionError


def check_output_dir(out_dir: str | Path, *inputs: str | Path) -> Path:
    """The output policy of both converters: ``out_dir`` is new or an empty directory, is not a
    symlink, and is neither an input nor inside one nor around one. Nothing is written here."""
    out = Path(out_dir)
    if out.is_symlink():
        raise ConversionError(
            f"output directory {str(out)!r} is a symlink (to {os.readlink(out)!r}); refusing to "
            "write through it: name a new directory"
        )
    target = out.resolve()
    for src in inputs:
        source = Path(src).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ConversionError(
                f"output directory {str(out)!r} is or overlaps the input {str(src)!r}; write "
                "the conversion to a separate new directory"
            )
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output directory {str(out)!r} is an existing file")
    if out.is_dir() and any(out.iterdir()):
        raise ConversionError(
            f"output directory {str(out)!r} exists and is not empty; converters only write a "
            "new or empty directory"
        )
    return out
