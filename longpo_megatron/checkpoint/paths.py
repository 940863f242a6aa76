"""Checkpoint directory layout: ``<root>/latest``, ``<root>/iter_XXXXXXX/``, atomic publication.

A save writes ``iter_XXXXXXX.tmp/``; only when every rank has finished is it renamed to
``iter_XXXXXXX/`` and ``latest`` rewritten (tmp file + fsync + ``os.replace``). Old checkpoints
are renamed to ``*.del`` before they are deleted, so a kill at any moment leaves either a
complete ``iter_*`` directory or a name that no loader accepts.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

from longpo_megatron.errors import UserError

LATEST = "latest"
"""Text file in the root naming the newest complete iteration directory."""
ITER_RE = re.compile(r"^iter_(\d{7,})$")
"""Complete iteration directories (``.tmp`` / ``.del`` suffixes never match)."""
TMP_SUFFIX = ".tmp"
DEL_SUFFIX = ".del"
COMPLETE_FILES = ("metadata.json", ".metadata", "common.pt")
"""Files every complete iteration directory holds."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the path (and key)."""


def iter_dir_name(step: int) -> str:
    """``iter_0000100`` for step 100."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"iter_{step:07d}"


def iter_step(name: str) -> Optional[int]:
    """The step of a complete iteration directory name, else None."""
    m = ITER_RE.match(name)
    return int(m.group(1)) if m else None


def fsync_path(path: Path) -> None:
    """fsync a file or directory (best effort where the filesystem refuses directories)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the directories bottom-up."""
    for dirpath, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced tmp file and ``os.replace`` (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def is_complete(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds every file of a finished save."""
    return all((ckpt_dir / name).is_file() for name in COMPLETE_FILES)


def read_latest(root: Path) -> Path:
    """The iteration directory ``<root>/latest`` names (must exist and be complete)."""
    latest = root / LATEST
    name = _read_pointer(latest)
    if iter_step(name) is None:
        raise CheckpointError(f"{latest}: names {name!r}, not an iter_XXXXXXX directory")
    target = root / name
    if not target.is_dir():
        raise CheckpointError(f"{latest}: names {name!r}, but {target} does not exist")
    if not is_complete(target):
        raise CheckpointError(f"{target} (named by {latest}) is incomplete: missing files")
    return target


def resolve(path: Union[str, Path]) -> Path:
    """The iteration directory for a root (via ``latest``), a ``latest`` file, or an iter dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if p.is_file() and p.name == LATEST:
        p = p.parent
    if (p / LATEST).is_file():
        return read_latest(p)
    if p.is_dir() and iter_step(p.name) is not None:
        if not is_complete(p):
            raise CheckpointError(f"{p}: incomplete checkpoint (missing {_missing(p)})")
        return p
    raise CheckpointError(
        f"{p}: no '{LATEST}' file and not an iter_XXXXXXX checkpoint directory "
        "(point checkpoint.load at a save directory or one of its iter_* directories)"
    )


def _missing(ckpt_dir: Path) -> list[str]:
    return [n for n in COMPLETE_FILES if not (ckpt_dir / n).is_file()]


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete iteration directories under ``root``, ascending."""
    if not root.is_dir():
        return []
    steps = [iter_step(p.name) for p in root.iterdir() if p.is_dir()]
    return sorted(s for s in steps if s is not None)


def remove_tree(path: Path) -> None:
    """Rename to ``*.del`` (atomic; no loader accepts it) and delete."""
    if not path.exists():
        return
    doomed = path.with_name(f"{path.name}{DEL_SUFFIX}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clear_leftovers(root: Path) -> None:
    """Delete ``*.tmp`` / ``*.del`` directories and torn ``.latest.*.tmp`` files that killed
    saves or prunes left behind."""
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("iter_") and p.name.endswith((TMP_SUFFIX, DEL_SUFFIX)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def _read_pointer(latest: Path) -> str:
    """The stripped text of a ``latest`` file; binary or unreadable content is a named error."""
    try:
        data = latest.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{latest}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{latest}: holds binary data, not the name of an iter_XXXXXXX directory"
        ) from None


def _latest_name(root: Path) -> Optional[str]:
    """What ``latest`` names, or None when it is absent or unreadable (a save rewrites it)."""
    latest = root / LATEST
    if not latest.is_file():
        return None
    try:
        return _read_pointer(latest)
    except CheckpointError:
        return None


def check_save_root(root: Union[str, Path], key: str = "checkpoint.save") -> None:
    """Refuse, before any step is spent, a save root that cannot hold checkpoints.

    The root must be a directory (or creatable: its nearest existing ancestor a writable
    directory); an existing root gets a probe file written, fsynced and removed (read-only or
    full storage fails here, not after a step of training).
    """
    p = Path(root)
    where = f"{key}={str(root)!r}"
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"{where}: is a file, not a directory")
    if not p.exists():
        ancestor = p.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CheckpointError(f"{where}: cannot be created ({ancestor} is not a directory)")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise CheckpointError(f"{where}: cannot be created ({ancestor} is not writable)")
        return
    probe = p / f".write-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"{where}: not writable ({e.strerror or e})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def publish(root: Path, tmp_dir: Path, final_dir: Path) -> None:
    """Make a finished ``tmp_dir`` visible as ``final_dir`` and point ``latest`` at it.

    A re-save of an existing step replaces it; if ``latest`` names it, ``latest`` first moves to
    the newest other complete checkpoint (when there is one), so it never names a missing dir.
    """
    fsync_tree(tmp_dir)
    if final_dir.exists():
        if _latest_name(root) == final_dir.name:
            others = [s for s in complete_steps(root) if iter_dir_name(s) != final_dir.name]
            if others:
                write_text_atomic(root / LATEST, iter_dir_name(others[-1]) + "\n")
        remove_tree(final_dir)
    os.rename(tmp_dir, final_dir)
    fsync_path(root)
    write_text_atomic(root / LATEST, final_dir.name + "\n")


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``latest``'s)."""
    keep_last = max(1, keep_last)
    latest_name = _latest_name(root)
    removed = []
    for step in complete_steps(root)[:-keep_last]:
        path = root / iter_dir_name(step)
        if path.name != latest_name:
            remove_tree(path)
            removed.append(path)
    return removed
