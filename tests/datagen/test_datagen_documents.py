"""Document readers: JSONL / text / Parquet, sharding, and one test per bad-input class."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from dg_helpers import CORPUS, ROOT, SHARD0, scripted_cfg
from scripted_backend import ScriptedBackend

from longpo_megatron.data.records import RecordError
from longpo_megatron.datagen.cli import run
from longpo_megatron.datagen.config import InputConfig
from longpo_megatron.datagen.documents import Document, iter_slots, shard_documents

LONG = " ".join(f"word{i}" for i in range(400))


def slots(*paths: Path, **kw: object) -> list:
    return list(iter_slots(InputConfig(paths=[str(p) for p in paths], **kw)))


def test_bundled_corpus_reads_in_a_fixed_order() -> None:
    docs = [d for _, d in slots(CORPUS)]
    assert all(isinstance(d, Document) for d in docs)
    assert [d.id for d in docs] == [
        "field_survey",
        "gazetteer-01",
        "gazetteer-02",
        "gazetteer-03",
        "gazetteer-04",
        "lantern_service",
        "seed_library",
    ]
    total = sum(p.stat().st_size for p in CORPUS.iterdir())
    assert total < 200_000 and min(len(d.text) for d in docs) > 7000


def test_jsonl_fields_defaults_and_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        {"id": "a", "text": "one\r\ntwo\r\n", "source": "web"},
        {"text": "no id here"},
        {"id": 7, "text": "integer id", "extra": "ignored"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    docs = [d for _, d in slots(path)]
    assert [(d.id, d.text, d.source, d.line) for d in docs] == [
        ("a", "one\ntwo", "web", 1),
        ("docs-2", "no id here", "docs.jsonl", 2),
        ("7", "integer id", "docs.jsonl", 3),
    ]


def test_parquet_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    table = pa.table({"id": ["p1", "p2", None], "text": ["first doc", "second doc", ""]})
    pq.write_table(table, path)
    got = slots(path)
    assert [(g, d.id, d.text) for g, d in got[:2]] == [
        (0, "p1", "first doc"),
        (1, "p2", "second doc"),
    ]
    err = got[2][1]
    assert isinstance(err, RecordError) and err.reason == "empty_string"
    assert f"{path}, line 3: field 'text'" in str(err)


def test_parquet_binary_text_with_invalid_utf8(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok text", b"bad \xff"], pa.binary())}), path)
    got = slots(path)
    assert got[0][1].text == "ok text"
    assert got[1][1].reason == "invalid_utf8" and "line 2: field 'text'" in str(got[1][1])


def test_text_files_and_max_documents(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.md").write_text("# A\n\nay")
    (tmp_path / "skip.bin").write_text("not a document")
    assert [d.id for _, d in slots(tmp_path)] == ["a", "b"]
    assert [d.id for _, d in slots(tmp_path, max_documents=1)] == ["a"]


def test_shards_partition_the_documents() -> None:
    cfg = InputConfig(paths=[str(CORPUS)])
    every = [d.id for _, d in shard_documents(cfg, (0, 1))]
    parts = [[d.id for _, d in shard_documents(cfg, (i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(every) and all(parts)
    assert parts[1] == every[1::3]


def test_missing_inputs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="input.paths"):
        slots(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no"):
        slots(tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown suffix"):
        slots(tmp_path / "x.csv")


BAD_LINES = [
    (b'{"id": "m", "text": "abc"', "malformed_json", "line 2", None),
    (b'{"id": "m"}', "missing_field", "line 2", "text"),
    (b'{"id": "m", "text": 5}', "wrong_type", "line 2", "text"),
    (b'{"id": ["m"], "text": "abc"}', "wrong_type", "line 2", "id"),
    (b'{"id": "m", "text": "  "}', "empty_string", "line 2", "text"),
    (b'{"id": "m", "text": "caf\xc3"}', "invalid_utf8", "line 2", None),
    (b'{"id": "m", "text": "lone \\ud800"}', "invalid_utf8", "line 2", "text"),
    (b'{"id": "m", "text": "abc", "source": 3}', "wrong_type", "line 2", "source"),
    (b'["not", "an", "object"]', "wrong_type", "line 2", None),
    (b'{"id": "good", "text": "again"}', "duplicate_id", "line 2", "id"),
]


@pytest.mark.parametrize(("raw", "reason", "where", "field"), BAD_LINES, ids=lambda x: str(x)[:20])
def test_bad_jsonl_line_errors_with_location(
    tmp_path: Path, raw: bytes, reason: str, where: str, field: str | None
) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"id": "good", "text": "fine"}\n' + raw + b"\n")
    with pytest.raises(RecordError) as info:
        shard_documents(InputConfig(paths=[str(path)]), (0, 1))
    err = info.value
    assert err.reason == reason and f"{path}, {where}" in str(err)
    if field is not None:
        assert f"field {field!r}" in str(err)


def test_bad_text_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(b"line one\nline two \xff\xfe\n")
    with pytest.raises(RecordError, match=r"doc.txt, line 2: invalid UTF-8") as info:
        shard_documents(InputConfig(paths=[str(path)]), (0, 1))
    assert info.value.reason == "invalid_utf8"
    (tmp_path / "doc.txt").write_text("  \n")
    with pytest.raises(RecordError, match="empty_string"):
        shard_documents(InputConfig(paths=[str(path)]), (0, 1))


def test_skip_policy_counts_every_bad_document(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    good = [json.dumps({"id": f"g{i}", "text": LONG}).encode() for i in range(2)]
    short = json.dumps({"id": "tiny", "text": "too short to chunk"}).encode()
    data = b"\n".join([good[0], *(raw for raw, *_ in BAD_LINES), short, good[1]]) + b"\n"
    path.write_bytes(data)
    cfg = scripted_cfg(tmp_path / "out", f"input.paths=[{path}]", "input.policy=skip")
    report = run(cfg, ScriptedBackend(cfg.backend))
    docs = report["documents"]
    # The "duplicate" line is fine here (no earlier "good"), but at 1 token it is too short.
    assert docs["documents_kept"] == 2
    assert docs["documents_skipped"] == {
        "document_too_short": 2,
        "empty_string": 1,
        "invalid_utf8": 2,
        "malformed_json": 1,
        "missing_field": 1,
        "wrong_type": 4,
    }
    assert len(docs["messages"]) == 11
    assert any(
        "line 12, record 'tiny': field 'text': document has 4" in m for m in docs["messages"]
    )
    written = (tmp_path / "out" / SHARD0 / "documents.jsonl").read_text()
    assert "too short" not in written and written.count("\n") == 2


def test_too_short_and_too_long_documents_error_by_default(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "s", "text": "short text"}) + "\n")
    cfg = scripted_cfg(tmp_path / "out", f"input.paths=[{path}]")
    with pytest.raises(RecordError, match=r"line 1, record 's': field 'text': document has 2"):
        run(cfg, ScriptedBackend(cfg.backend))
    path.write_text(json.dumps({"id": "l", "text": LONG}) + "\n")
    cfg = scripted_cfg(
        tmp_path / "out2", f"input.paths=[{path}]", "chunking.max_document_tokens=300"
    )
    with pytest.raises(RecordError, match="over chunking.max_document_tokens=300") as info:
        run(cfg, ScriptedBackend(cfg.backend))
    assert info.value.reason == "document_too_long"


def test_generated_corpus_files_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "tools" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.build().items():
        assert (CORPUS / name).read_text(encoding="utf-8") == text, name
