"""LongPO preference records (JSONL, schema_version 1): schema, validation and reading.

Every bad input becomes a :class:`RecordError` whose message names the file, the line, the record
id when known, and the field and rule broken. With ``policy="skip"`` bad lines are counted in a
:class:`DataReport` instead; nothing is ever dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from longpo_megatron.errors import UserError

SCHEMA_VERSION = 1
POLICIES = ("error", "skip")
TURN_FIELDS = ("instruction", "short_context", "chosen", "rejected")
RECORD_FIELDS = ("schema_version", "id", "document", "turns", "metadata")


class DataError(UserError, ValueError):
    """A data file or tokenizer that cannot be used as a whole (names the path and the rule)."""


class DataFileNotFound(UserError, FileNotFoundError):
    """A data file or tokenizer directory that does not exist (names the path)."""


class RecordError(UserError, ValueError):
    """One invalid record: ``reason`` is a short class key (e.g. ``missing_field``)."""

    def __init__(
        self,
        reason: str,
        rule: str,
        *,
        field: Optional[str] = None,
        path: Optional[str] = None,
        line: Optional[int] = None,
        record_id: Optional[str] = None,
    ) -> None:
        self.reason = reason
        self.rule = rule
        self.field = field
        self.path = path
        self.line = line
        self.record_id = record_id
        super().__init__(self._compose())

    def _compose(self) -> str:
        where = []
        if self.path is not None:
            where.append(f"{self.path}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.record_id is not None:
            where.append(f"record {self.record_id!r}")
        loc = ", ".join(where) if where else "<record>"
        fld = f" field {self.field!r}:" if self.field is not None else ""
        return f"{loc}:{fld} {self.rule} [{self.reason}]"

    def located(
        self,
        path: Optional[str] = None,
        line: Optional[int] = None,
        record_id: Optional[str] = None,
    ) -> RecordError:
        """A copy with the location filled in (keeps any location already known)."""
        return RecordError(
            self.reason,
            self.rule,
            field=self.field,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
            record_id=self.record_id if self.record_id is not None else record_id,
        )


@dataclass
class DataReport:
    """What happened while loading data: counts of kept records and of skips per reason."""

    path: str = ""
    lines_read: int = 0
    """Non-blank lines seen."""
    records_ok: int = 0
    """Records that passed every stage so far."""
    skipped: Counter = field(default_factory=Counter)
    """Reason key -> number of skipped records."""
    problems: list[tuple[int, str]] = field(default_factory=list)
    """(line, reason) for every skipped record (line 0 when unknown)."""
    messages: list[str] = field(default_factory=list)
    """Full error message of every skipped record, in order."""

    def add_skip(self, err: RecordError) -> None:
        """Count one skipped record."""
        self.skipped[err.reason] += 1
        self.problems.append((err.line or 0, err.reason))
        self.messages.append(str(err))

    @property
    def total_skipped(self) -> int:
        """Records skipped for any reason."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for logs."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"data {self.path}: {self.lines_read} lines, {self.records_ok} records kept, "
            f"{self.total_skipped} skipped ({reasons})"
        )


def check_encodable(value: str, name: str) -> str:
    """``value`` unchanged when it is valid Unicode text; a lone surrogate (``"\\ud800"``, which
    JSON allows but no tokenizer can encode) is a :class:`RecordError` naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(
            "invalid_utf8", f"not encodable as UTF-8 (lone surrogate at {exc.start})", field=name
        ) from None
    return value


def _require_str(obj: dict[str, Any], key: str, prefix: str = "") -> str:
    """A required, non-empty string field."""
    name = f"{prefix}{key}"
    if key not in obj:
        raise RecordError("missing_field", "required field is missing", field=name)
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"must be a string, got {type(value).__name__}", field=name)
    if not value.strip():
        raise RecordError("empty_string", "must be a non-empty (non-blank) string", field=name)
    return check_encodable(value, name)


def _reject_unknown(obj: dict[str, Any], allowed: tuple[str, ...], prefix: str = "") -> None:
    """Unknown keys are an error: an ignored key would be silently dropped data (or a typo)."""
    for key in obj:
        if key not in allowed:
            raise RecordError(
                "unknown_field",
                f"unknown field (allowed: {', '.join(allowed)})",
                field=f"{prefix}{key}",
            )


@dataclass(frozen=True)
class Turn:
    """One instruction turn: chunk-grounded short context plus the preferred/dispreferred answer."""

    instruction: str
    short_context: str
    chosen: str
    rejected: str

    @classmethod
    def from_dict(cls, obj: Any, index: int = 0) -> Turn:
        """Validate and build; ``index`` only names the turn in errors."""
        prefix = f"turns[{index}]."
        if not isinstance(obj, dict):
            raise RecordError(
                "wrong_type",
                f"must be an object, got {type(obj).__name__}",
                field=f"turns[{index}]",
            )
        _reject_unknown(obj, TURN_FIELDS, prefix)
        values = {key: _require_str(obj, key, prefix) for key in TURN_FIELDS}
        return cls(**values)

    def to_dict(self) -> dict[str, str]:
        """JSON-ready dict in schema field order."""
        return {key: getattr(self, key) for key in TURN_FIELDS}


@dataclass(frozen=True)
class PreferenceRecord:
    """One LongPO record: a long document and one or more preference turns about it."""

    id: str
    document: str
    turns: tuple[Turn, ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    schema_version: int = SCHEMA_VERSION
    line: Optional[int] = field(default=None, compare=False)
    """Source line (1-based) when read from a file; not serialized."""

    @classmethod
    def from_dict(cls, obj: Any, line: Optional[int] = None) -> PreferenceRecord:
        """Validate a parsed JSON object; raises :class:`RecordError` (without file location)."""
        if not isinstance(obj, dict):
            raise RecordError(
                "wrong_type", f"a record must be a JSON object, got {type(obj).__name__}"
            )
        _check_schema_version(obj)
        _reject_unknown(obj, RECORD_FIELDS)
        rec_id = _require_str(obj, "id")
        try:
            document = _require_str(obj, "document")
            turns = _parse_turns(obj)
            metadata = obj.get("metadata", {})
            if not isinstance(metadata, dict):
                raise RecordError(
                    "wrong_type",
                    f"must be an object, got {type(metadata).__name__}",
                    field="metadata",
                )
        except RecordError as err:
            raise err.located(record_id=rec_id) from None
        return cls(rec_id, document, turns, dict(metadata), SCHEMA_VERSION, line)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in schema field order (``line`` is not serialized)."""
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "document": self.document,
            "turns": [t.to_dict() for t in self.turns],
            "metadata": dict(self.metadata),
        }


def _check_schema_version(obj: dict[str, Any]) -> None:
    if "schema_version" not in obj:
        raise RecordError("missing_field", "required field is missing", field="schema_version")
    version = obj["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(
            "wrong_type",
            f"must be an integer, got {type(version).__name__}",
            field="schema_version",
        )
    if version != SCHEMA_VERSION:
        raise RecordError(
            "schema_version",
            f"unsupported schema_version {version} (this reader supports {SCHEMA_VERSION})",
            field="schema_version",
        )


def _parse_turns(obj: dict[str, Any]) -> tuple[Turn, ...]:
    if "turns" not in obj:
        raise RecordError("missing_field", "required field is missing", field="turns")
    turns = obj["turns"]
    if not isinstance(turns, list):
        raise RecordError(
            "wrong_type", f"must be a list, got {type(turns).__name__}", field="turns"
        )
    if not turns:
        raise RecordError("no_turns", "must hold at least one turn", field="turns")
    return tuple(Turn.from_dict(t, i) for i, t in enumerate(turns))


def _parse_line(raw: bytes, path: str, lineno: int) -> PreferenceRecord:
    """Decode, parse and validate one non-blank line; errors carry the location."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            "invalid_utf8", f"invalid UTF-8 at byte {exc.start}", path=path, line=lineno
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            "malformed_json",
            f"malformed JSON: {exc.msg} at column {exc.colno}",
            path=path,
            line=lineno,
        ) from None
    rec_id = obj.get("id") if isinstance(obj, dict) else None
    try:
        return PreferenceRecord.from_dict(obj, line=lineno)
    except RecordError as err:
        known = rec_id if isinstance(rec_id, str) else None
        raise err.located(path=path, line=lineno, record_id=known) from None


def read_records(
    path: str | Path, policy: str = "error"
) -> tuple[list[PreferenceRecord], DataReport]:
    """Read a JSONL file of records.

    ``policy="error"`` raises on the first bad line; ``"skip"`` counts it in the report.
    Blank lines are ignored. Duplicate ids are an error too (they would alias reference scores).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    p = Path(path)
    if not p.is_file():
        raise DataFileNotFound(f"data file {str(p)!r} does not exist or is not a file")
    report = DataReport(path=str(p))
    records: list[PreferenceRecord] = []
    seen: dict[str, int] = {}
    data = p.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        report.lines_read += 1
        try:
            rec = _parse_line(raw, str(p), lineno)
            if rec.id in seen:
                raise RecordError(
                    "duplicate_id",
                    f"id already used on line {seen[rec.id]}",
                    field="id",
                    path=str(p),
                    line=lineno,
                    record_id=rec.id,
                )
        except RecordError as err:
            if policy == "error":
                raise
            report.add_skip(err)
            continue
        seen[rec.id] = lineno
        records.append(rec)
    report.records_ok = len(records)
    return records, report


def records_to_jsonl(records: list[PreferenceRecord]) -> str:
    """ASCII JSONL text (one object per line, trailing newline)."""
    return "".join(json.dumps(r.to_dict(), ensure_ascii=True) + "\n" for r in records)


def write_records(path: str | Path, records: list[PreferenceRecord]) -> None:
    """Write records as ASCII JSONL, e.g. for generated data sets."""
    Path(path).write_text(records_to_jsonl(records), encoding="ascii")
