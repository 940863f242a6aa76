"""Crash-safe stage outputs: append-only JSONL written a whole batch at a time, and a manifest.

A batch's lines go out in one write, then flush + fsync. After a kill the file may end in a
torn line or hold only part of its last batch; :meth:`StageFile.load` cuts both off, so the
rerun redoes exactly the unfinished batches (same batches, same seeds: same results), and no
line is ever duplicated or lost. Whole-file outputs are written to a temporary file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from longpo_megatron.data.records import DataError


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Short stable hash of JSON-able settings."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]


def dump_line(row: Mapping[str, Any]) -> bytes:
    """One ASCII JSON line."""
    return (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """A whole JSONL file, atomically."""
    write_atomic(path, b"".join(dump_line(r) for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All lines of a complete JSONL file; a corrupt line is an error naming file and line."""
    return read_jsonl_bytes(path.read_bytes(), path)


class StageFile:
    """Append-only results of one generation stage; every row has ``key`` and ``batch``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, batches: Mapping[int, set[str]]) -> dict[str, dict[str, Any]]:
        """Rows of fully written batches by key; the rest is cut off the file.

        ``batches`` maps batch index -> the keys it must hold. A row of an unknown batch or
        key means the file was made from other inputs: an error (the manifest should have
        caught it first).
        """
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # a torn last line (no newline yet) is dropped
        rows = read_jsonl_bytes(data[:end], self.path)
        by_batch: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            b = row.get("batch")
            if b not in batches or row.get("key") not in batches[b]:
                raise ValueError(
                    f"{self.path}: row {row.get('key')!r} of batch {b!r} does not belong to "
                    "this stage's work list (inputs changed?); use a new output_dir or overwrite"
                )
            by_batch.setdefault(b, []).append(row)
        done = {b: r for b, r in by_batch.items() if {x["key"] for x in r} == batches[b]}
        kept = [row for row in rows if row["batch"] in done]
        if len(kept) != len(rows) or end != len(data):
            write_atomic(self.path, b"".join(dump_line(r) for r in kept))
        return {row["key"]: row for row in kept}

    def append_batch(self, rows: list[dict[str, Any]]) -> None:
        """Append one batch's rows in a single write, then flush and fsync."""
        with open(self.path, "ab") as fh:
            fh.write(b"".join(dump_line(r) for r in rows))
            fh.flush()
            os.fsync(fh.fileno())


def read_jsonl_bytes(data: bytes, path: Path) -> list[dict[str, Any]]:
    """Parse complete JSONL bytes (errors name the file and line)."""
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: line {lineno}: corrupt stage output ({exc})") from None
    return rows


class Manifest:
    """``manifest.json`` of a shard: per stage its settings fingerprint, state and stats."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.exists():
            self.data = json.loads(path.read_text(encoding="utf-8"))

    def stage(self, name: str) -> dict[str, Any]:
        """The entry of a stage ({} when it never started)."""
        return dict(self.data["stages"].get(name, {}))

    def complete(self, name: str) -> bool:
        """Whether the stage finished."""
        return bool(self.stage(name).get("complete"))

    def set_stage(self, name: str, **entry: Any) -> None:
        """Replace a stage's entry and save."""
        self.data["stages"][name] = entry
        self.save()

    def update_stage(self, name: str, **changes: Any) -> None:
        """Change keys of a stage's entry and save."""
        self.data["stages"].setdefault(name, {}).update(changes)
        self.save()

    def save(self) -> None:
        """Write atomically; the in-memory copy takes the saved (key-sorted) form, so records
        made in this process and after a restart serialize the same."""
        text = json.dumps(self.data, indent=1, sort_keys=True, ensure_ascii=True) + "\n"
        write_atomic(self.path, text.encode("ascii"))
        self.data = json.loads(text)
