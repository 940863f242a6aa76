"""Long input documents: JSONL, plain-text and Parquet readers with located validation.

Every document slot (a non-blank JSONL line, a text file, a Parquet row) gets a global index in
a fixed order (input paths sorted, then lines / rows), valid or not, so ``shard=i/n`` picks the
same slots on every machine. A bad slot becomes a :class:`RecordError` naming file, line (the
1-based row for Parquet) and field; the caller errors or counts it, per ``input.policy``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from longpo_megatron.data.records import DataFileNotFound, RecordError, check_encodable
from longpo_megatron.datagen.config import DatagenConfigError, InputConfig

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".tex")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Document:
    """One validated long document."""

    id: str
    text: str
    """Stripped, with \\r\\n and \\r turned into \\n (chunk offsets index this text)."""
    source: str
    path: str
    line: int
    """1-based line (JSONL), row (Parquet), or 1 (a whole text file)."""


Slot = tuple[int, Union[Document, RecordError]]
"""(global index, the document or why it is bad)."""


def input_files(paths: list[str]) -> list[Path]:
    """Expand directories (recursively, known suffixes only) and check every file exists."""
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise DataFileNotFound(f"input.paths: directory {raw!r} holds no {SUFFIXES}")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise DatagenConfigError(
                    f"input.paths: {raw!r} has an unknown suffix (use {SUFFIXES})"
                )
            files.append(p)
        else:
            raise DataFileNotFound(f"input.paths: {raw!r} does not exist")
    return files


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _text_value(value: Any, name: str) -> str:
    """A required non-blank string field (bytes must be UTF-8)."""
    if value is None:
        raise RecordError("missing_field", "required field is missing (or null)", field=name)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(
                "invalid_utf8", f"invalid UTF-8 at byte {exc.start}", field=name
            ) from None
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"must be a string, got {type(value).__name__}", field=name)
    check_encodable(value, name)
    if not value.strip():
        raise RecordError("empty_string", "must be a non-empty (non-blank) string", field=name)
    return value


def _optional_id(value: Any, name: str, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(
            "wrong_type", f"must be a string or integer, got {type(value).__name__}", field=name
        )
    if isinstance(value, str) and not value.strip():
        raise RecordError("empty_string", "must be a non-empty (non-blank) string", field=name)
    return str(value).strip()


def _from_mapping(obj: Any, cfg: InputConfig, path: Path, line: int) -> Document:
    """Validate one JSON object / Parquet row as a document."""
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", f"a document must be an object, got {type(obj).__name__}")
    text = _text_value(obj.get(cfg.text_field), cfg.text_field)
    doc_id = _optional_id(obj.get(cfg.id_field), cfg.id_field, f"{path.stem}-{line}")
    source = obj.get(cfg.source_field)
    if source is not None and not isinstance(source, str):
        raise RecordError(
            "wrong_type", f"must be a string, got {type(source).__name__}", field=cfg.source_field
        )
    return Document(doc_id, _normalize(text), source or path.name, str(path), line)


def _jsonl_slots(path: Path, cfg: InputConfig) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"malformed JSON: {exc.msg} at column {exc.colno}"
            yield lineno, RecordError("malformed_json", msg)
            continue
        try:
            yield lineno, _from_mapping(obj, cfg, path, lineno)
        except RecordError as err:
            known = obj.get(cfg.id_field) if isinstance(obj, dict) else None
            yield lineno, err.located(record_id=known if isinstance(known, str) else None)


def _text_slot(path: Path) -> Union[Document, RecordError]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}", line=line)
    if not text.strip():
        return RecordError("empty_string", "the file holds no text", field="text")
    return Document(path.stem, _normalize(text), path.name, str(path), 1)


def _parquet_slots(path: Path, cfg: InputConfig) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {str(path)!r} needs pyarrow: pip install 'longpo-megatron[datagen]'"
        ) from None
    pf = pq.ParquetFile(str(path))
    names = set(pf.schema_arrow.names)
    wanted = [c for c in (cfg.text_field, cfg.id_field, cfg.source_field) if c in names]
    row = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=256):
        for obj in batch.to_pylist():
            row += 1
            try:
                yield row, _from_mapping(obj, cfg, path, row)
            except RecordError as err:
                yield row, err


def iter_slots(cfg: InputConfig) -> Iterator[Slot]:
    """Every document slot of the inputs, in the fixed global order."""
    index = 0
    for path in input_files(list(cfg.paths)):
        if path.suffix in TEXT_SUFFIXES:
            items: Iterator[tuple[int, Any]] = iter([(1, _text_slot(path))])
        elif path.suffix in PARQUET_SUFFIXES:
            items = _parquet_slots(path, cfg)
        else:
            items = _jsonl_slots(path, cfg)
        for line, item in items:
            if cfg.max_documents is not None and index >= cfg.max_documents:
                return
            if isinstance(item, RecordError):
                item = item.located(path=str(path), line=line)
            yield index, item
            index += 1


def shard_documents(
    cfg: InputConfig, shard: tuple[int, int], on_error: Optional[Any] = None
) -> list[tuple[int, Document]]:
    """This shard's valid documents; bad ones raise (policy error) or go to ``on_error``.

    Duplicate ids within the shard are bad input too (they would alias work keys).
    """
    index, count = shard
    seen: dict[str, str] = {}
    out: list[tuple[int, Document]] = []
    for g, item in iter_slots(cfg):
        if g % count != index:
            continue
        if isinstance(item, Document) and item.id in seen:
            item = RecordError(
                "duplicate_id",
                f"document id already used at {seen[item.id]}",
                field=cfg.id_field,
                path=item.path,
                line=item.line,
                record_id=item.id,
            )
        if isinstance(item, RecordError):
            if cfg.policy == "error" or on_error is None:
                raise item
            on_error(item)
            continue
        seen[item.id] = f"{item.path} line {item.line}"
        out.append((g, item))
    return out
