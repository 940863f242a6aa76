"""Record schema: one test per bad-input class, error locations, skip-policy accounting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from longpo_megatron.data.records import PreferenceRecord, RecordError, read_records


def good(rec_id: str = "r-1", turns: int = 2) -> dict[str, Any]:
    """A valid schema_version 1 record."""
    return {
        "schema_version": 1,
        "id": rec_id,
        "document": "A long document.",
        "turns": [
            {
                "instruction": f"Question {i}?",
                "short_context": f"Chunk {i}.",
                "chosen": f"Good answer {i}.",
                "rejected": f"Bad answer {i}.",
            }
            for i in range(turns)
        ],
        "metadata": {"source": "test"},
    }


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    raw = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        raw.append(line.encode("utf-8") if isinstance(line, str) else line)
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def one_bad(tmp_path: Path, bad: bytes | str | dict) -> RecordError:
    """Put ``bad`` on line 3 (after a good record and a blank line) and return the error."""
    path = write_lines(tmp_path / "recs.jsonl", [good("ok-1"), "", bad, good("ok-2")])
    with pytest.raises(RecordError) as info:
        read_records(path)
    err = info.value
    assert str(path) in str(err) and "line 3" in str(err)
    assert err.line == 3
    return err


def with_turn(field: str, value: Any) -> dict[str, Any]:
    rec = good("bad-1")
    rec["turns"][1][field] = value
    return rec


def test_round_trip(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "ok.jsonl", [good("a"), "   ", good("b", turns=1)])
    records, report = read_records(path)
    assert [r.id for r in records] == ["a", "b"]
    assert [r.line for r in records] == [1, 3]
    assert records[0].to_dict() == good("a")
    assert PreferenceRecord.from_dict(good("a")) == records[0]
    assert report.records_ok == 2 and report.lines_read == 2 and report.total_skipped == 0


def test_malformed_json(tmp_path: Path) -> None:
    err = one_bad(tmp_path, '{"schema_version": 1, "id": "x",')
    assert err.reason == "malformed_json" and "malformed JSON" in str(err)


def test_invalid_utf8(tmp_path: Path) -> None:
    err = one_bad(tmp_path, b'{"id": "\xff\xfe"}')
    assert err.reason == "invalid_utf8" and "UTF-8" in str(err)


def test_missing_field(tmp_path: Path) -> None:
    rec = good("bad-1")
    del rec["document"]
    err = one_bad(tmp_path, rec)
    assert err.reason == "missing_field" and "'document'" in str(err) and "'bad-1'" in str(err)


def test_missing_turn_field(tmp_path: Path) -> None:
    rec = good("bad-1")
    del rec["turns"][1]["rejected"]
    err = one_bad(tmp_path, rec)
    assert err.reason == "missing_field" and "'turns[1].rejected'" in str(err)


def test_mistyped_field(tmp_path: Path) -> None:
    err = one_bad(tmp_path, with_turn("chosen", 42))
    assert err.reason == "wrong_type"
    assert "'turns[1].chosen'" in str(err) and "string" in str(err) and "int" in str(err)
    assert "'bad-1'" in str(err)


def test_mistyped_turns_and_record(tmp_path: Path) -> None:
    rec = good("bad-1")
    rec["turns"] = {"instruction": "not a list"}
    err = one_bad(tmp_path, rec)
    assert err.reason == "wrong_type" and "'turns'" in str(err)
    assert one_bad(tmp_path, "[1, 2]").reason == "wrong_type"


def test_empty_string(tmp_path: Path) -> None:
    err = one_bad(tmp_path, with_turn("instruction", "  "))
    assert err.reason == "empty_string" and "'turns[1].instruction'" in str(err)


def test_wrong_schema_version(tmp_path: Path) -> None:
    rec = good("bad-1")
    rec["schema_version"] = 2
    err = one_bad(tmp_path, rec)
    assert err.reason == "schema_version" and "'schema_version'" in str(err)
    assert "'bad-1'" in str(err)


def test_no_turns(tmp_path: Path) -> None:
    rec = good("bad-1")
    rec["turns"] = []
    err = one_bad(tmp_path, rec)
    assert err.reason == "no_turns" and "'turns'" in str(err)


def test_unknown_field_and_duplicate_id(tmp_path: Path) -> None:
    rec = good("bad-1")
    rec["turns"][0]["chosen_answer"] = "typo"
    err = one_bad(tmp_path, rec)
    assert err.reason == "unknown_field" and "'turns[0].chosen_answer'" in str(err)
    err = one_bad(tmp_path, good("ok-1"))
    assert err.reason == "duplicate_id" and "line 1" in str(err)


def test_skip_policy_counts_every_bad_line(tmp_path: Path) -> None:
    no_turns, version, missing = good("n"), good("v"), good("m")
    no_turns["turns"] = []
    version["schema_version"] = 0
    del missing["id"]
    lines: list[bytes | str | dict] = [
        good("a"),
        "{oops",
        b"\xc3\x28",
        "",
        missing,
        with_turn("chosen", None),
        with_turn("rejected", ""),
        version,
        no_turns,
        good("b"),
    ]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    records, report = read_records(path, policy="skip")
    assert [r.id for r in records] == ["a", "b"]
    assert dict(report.skipped) == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_field": 1,
        "wrong_type": 1,
        "empty_string": 1,
        "schema_version": 1,
        "no_turns": 1,
    }
    assert report.problems == [
        (2, "malformed_json"),
        (3, "invalid_utf8"),
        (5, "missing_field"),
        (6, "wrong_type"),
        (7, "empty_string"),
        (8, "schema_version"),
        (9, "no_turns"),
    ]
    assert report.lines_read == 9 and report.records_ok == 2 and report.total_skipped == 7
    assert len(report.messages) == 7 and all(str(path) in m for m in report.messages)
    assert "7 skipped" in report.summary()


def test_bad_policy_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="policy"):
        read_records(tmp_path / "x.jsonl", policy="ignore")
    with pytest.raises(FileNotFoundError, match="x.jsonl"):
        read_records(tmp_path / "x.jsonl")
