"""Per-file checksums of a checkpoint: written before publication, verified before loading.

A save records ``checksums.json`` in the iteration directory (``{"algorithm", "files": {name:
{"size", "digest"}}}``) right before the directory is published, so a published checkpoint
always carries the manifest of exactly its files. A load checks every listed file's size and
BLAKE2b digest before anything is read: a torn, truncated or bit-flipped shard is refused with a
message naming the file instead of loading garbage (or training on to NaN). The work is split
over the ranks of the job when a process group is up. ``checkpoint.checksums=false`` turns both
off (a checkpoint without a manifest loads unverified, with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from longpo_megatron.checkpoint.paths import CheckpointError

MANIFEST = "checksums.json"
"""Manifest file inside an iteration directory."""
ALGORITHM = "blake2b-128"
_CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    """BLAKE2b (16-byte) hex digest of a file, read in 8 MiB chunks (the GIL is released)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt_dir: Path) -> list[str]:
    """Relative paths of every file under ``ckpt_dir`` except the manifest, sorted."""
    out = []
    for dirpath, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _my_share(names: list[str], use_dist: bool) -> list[str]:
    if not use_dist:
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather(part: dict, use_dist: bool) -> dict:
    """Union of every rank's ``part`` (every rank gets it)."""
    if not use_dist:
        return part
    parts: list[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p or {})
    return merged


def write_manifest(ckpt_dir: Path, use_dist: bool) -> None:
    """Hash every file of a finished (unpublished) save; rank 0 writes the manifest.

    Collective when ``use_dist``: call it on every rank after all shards are written.
    """
    ckpt_dir = Path(ckpt_dir)
    names = _files(ckpt_dir)
    mine = {
        n: {"size": (ckpt_dir / n).stat().st_size, "digest": file_digest(ckpt_dir / n)}
        for n in _my_share(names, use_dist)
    }
    entries = _gather(mine, use_dist)
    if not use_dist or dist.get_rank() == 0:
        body = {"algorithm": ALGORITHM, "files": {n: entries[n] for n in names}}
        with open(ckpt_dir / MANIFEST, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())


def _read_manifest(ckpt_dir: Path) -> Optional[dict]:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
        files = body["files"]
        ok = body.get("algorithm") == ALGORITHM and isinstance(files, dict)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checksum manifest ({e})") from None
    if not ok:
        raise CheckpointError(f"{path}: not a {ALGORITHM} checksum manifest")
    return files


def _problem(ckpt_dir: Path, name: str, entry: dict) -> Optional[str]:
    """Why file ``name`` does not match its manifest entry (None when it does)."""
    path = ckpt_dir / name
    if not path.is_file():
        return f"{path}: listed in {MANIFEST} but missing"
    try:
        size, digest = int(entry["size"]), str(entry["digest"])
    except (KeyError, TypeError, ValueError):
        return f"{ckpt_dir / MANIFEST}: bad entry for {name!r}"
    actual = path.stat().st_size
    if actual != size:
        return f"{path}: {actual} bytes, but {size} were saved (truncated or overwritten file)"
    if file_digest(path) != digest:
        return f"{path}: checksum mismatch (the file changed after it was saved: corrupt shard)"
    return None


def verify(ckpt_dir: Path, use_dist: bool) -> bool:
    """Check every file of the manifest; raise :class:`CheckpointError` naming the first bad one.

    Returns False when the directory has no manifest (saved without checksums). Collective when
    ``use_dist``: every rank checks its share and every rank raises the same error.
    """
    ckpt_dir = Path(ckpt_dir)
    files = _read_manifest(ckpt_dir)
    if files is None:
        return False
    names = sorted(files)
    mine = {n: _problem(ckpt_dir, n, files[n]) for n in _my_share(names, use_dist)}
    problems = _gather({n: p for n, p in mine.items() if p}, use_dist)
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        raise CheckpointError(problems[first] + more)
    return True


def check(ckpt_dir: Path, enabled: bool, use_dist: bool) -> None:
    """:func:`verify` when ``enabled``; warn (once per job) about a checkpoint with no manifest."""
    if not enabled or verify(ckpt_dir, use_dist):
        return
    if not use_dist or dist.get_rank() == 0:
        print(f"warning: {ckpt_dir} has no {MANIFEST}: loading it unverified", flush=True)
