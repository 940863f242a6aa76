"""The pipeline with the scripted backend: accounting, records, determinism, resume, shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from dg_helpers import SHARD0, digest, rows, scripted_cfg
from scripted_backend import ScriptedBackend

from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.records import (
    PreferenceRecord,
    RecordError,
    read_records,
    records_to_jsonl,
    write_records,
)
from longpo_megatron.data.tokenizer import ByteChatTokenizer
from longpo_megatron.datagen.cli import run
from longpo_megatron.datagen.pipeline import StageStateError

FILES = ("documents", "instructions", "chosen", "rejected", "records")


class Crash(RuntimeError):
    """Stands in for a kill in the middle of a stage."""


class CrashingBackend(ScriptedBackend):
    """Raises on the N-th generate call."""

    def __init__(self, cfg, crash_at: int) -> None:
        super().__init__(cfg)
        self.crash_at = crash_at

    def generate(self, requests, sampling, batch_seed):
        if self.calls + 1 >= self.crash_at:
            raise Crash(f"crash at call {self.calls + 1}")
        return super().generate(requests, sampling, batch_seed)


def go(out: Path, *extra: str, backend: ScriptedBackend | None = None) -> dict:
    cfg = scripted_cfg(out, *extra)
    return run(cfg, backend or ScriptedBackend(cfg.backend))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One uninterrupted run over the whole bundled corpus."""
    out = tmp_path_factory.mktemp("baseline")
    report = go(out)
    return SimpleNamespace(out=out, report=report, dir=out / SHARD0)


def test_every_item_is_accounted_for(baseline: SimpleNamespace) -> None:
    rep = baseline.report
    ins, rec = rep["instructions"], rep["records"]
    assert rep["documents"]["documents_kept"] == 7 and rep["documents"]["documents_skipped"] == {}
    assert ins["chunks"] == rep["documents"]["chunks"] == sum(ins["outcome"].values())
    assert {"ok", "no_questions", "wrong_count"} <= set(ins["outcome"])
    assert ins["instructions"] == ins["outcome"]["ok"] == rep["chosen"]["requests"]
    assert rec["pairs"] == rep["rejected"]["requests"] == ins["instructions"]
    assert rec["pairs"] == rec["pairs_kept"] + sum(rec["pairs_dropped"].values())
    for reason in ("refusal", "repetition", "empty", "truncated"):
        assert any(k.endswith(reason) for k in rec["pairs_dropped"]), reason
    records = rows(baseline.dir / "records.jsonl")
    turns = sum(len(r["turns"]) for r in records)
    assert rec["pairs_kept"] == turns + sum(rec["turns_dropped"].values())
    assert rec["records"] == len(records) > 5
    assert json.loads((baseline.dir / "report.json").read_text()) == rep


def test_records_hold_clean_pairs_and_their_provenance(baseline: SimpleNamespace) -> None:
    records, report = read_records(baseline.dir / "records.jsonl")
    assert report.total_skipped == 0
    docs = {d["doc_id"]: d for d in rows(baseline.dir / "documents.jsonl")}
    for rec in records:
        meta = rec.metadata
        doc = docs[meta["document_id"]]
        assert rec.document == doc["text"] and 1 <= len(rec.turns) <= 4
        assert meta["chunks"] == sorted(meta["chunks"])
        for turn, chunk in zip(rec.turns, meta["chunks"]):
            start, end, _ = doc["chunks"][chunk]
            assert turn.short_context == doc["text"][start:end]
            assert "sorry" not in turn.chosen and "again again" not in turn.rejected
            assert turn.chosen.startswith(f"Reading {len(turn.short_context.split())} words")
        gen = meta["generator"]
        assert gen["seed"] == 1234 and gen["chosen"]["backend"]["backend"] == "scripted"
        assert gen["chosen"]["sampling"]["do_sample"] is False
        assert gen["instructions"]["instructions"]["num_questions"] == 4
        assert meta["stage"] == "demo" and meta["source"] == doc["source"]
        lengths = meta["token_lengths"]
        assert len(lengths["short_chosen"]) == len(rec.turns) == len(lengths["generator_chosen"])


def test_training_reads_the_records_directly(baseline: SimpleNamespace) -> None:
    cfg = SimpleNamespace(
        path=baseline.dir / "records.jsonl",
        max_seq_length=65536,
        max_ref_seq_length=4096,
        over_length_policy="error",
    )
    dataset, report = load_dataset(cfg, ByteChatTokenizer())
    assert len(dataset) == baseline.report["records"]["records"]
    for pair, rec in zip(dataset.pairs, dataset.records):
        lengths = rec.metadata["token_lengths"]
        assert len(pair.chosen) == lengths["long_chosen"]
        assert [len(ids) for ids, _ in pair.ref_rejected] == lengths["short_rejected"]


def test_reruns_are_identical_and_skip_finished_work(
    baseline: SimpleNamespace, tmp_path: Path
) -> None:
    go(tmp_path)
    for name in FILES:
        assert digest(tmp_path / SHARD0 / f"{name}.jsonl") == digest(
            baseline.dir / f"{name}.jsonl"
        ), name
    backend = ScriptedBackend(scripted_cfg(tmp_path).backend)
    go(tmp_path, backend=backend)
    assert backend.calls == 0


@pytest.mark.parametrize("crash_at", [3, 9, 14])
def test_crash_and_resume_equals_uninterrupted(
    baseline: SimpleNamespace, tmp_path: Path, crash_at: int
) -> None:
    cfg = scripted_cfg(tmp_path)
    with pytest.raises(Crash):
        run(cfg, CrashingBackend(cfg.backend, crash_at))
    assert not (tmp_path / SHARD0 / "records.jsonl").exists()
    stages = ("instructions", "chosen", "rejected")
    done = [tmp_path / SHARD0 / f"{s}.jsonl" for s in stages]
    done_before = sum(len(rows(p)) for p in done if p.exists())
    resumed = ScriptedBackend(cfg.backend)
    run(cfg, resumed)
    total = sum(baseline.report[s]["requests"] for s in stages)
    assert 0 < done_before < total and resumed.requests == total - done_before
    for name in FILES:
        assert digest(tmp_path / SHARD0 / f"{name}.jsonl") == digest(
            baseline.dir / f"{name}.jsonl"
        ), name


def test_torn_line_and_partial_batch_are_redone(baseline: SimpleNamespace, tmp_path: Path) -> None:
    shutil.copytree(baseline.out, tmp_path, dirs_exist_ok=True)
    shard = tmp_path / SHARD0
    manifest = json.loads((shard / "manifest.json").read_text())
    manifest["stages"]["chosen"]["complete"] = False
    (shard / "manifest.json").write_text(json.dumps(manifest))
    lines = (shard / "chosen.jsonl").read_bytes().splitlines(keepends=True)
    # Keep 1.5 batches: the half batch must be redone, the torn line cut off.
    (shard / "chosen.jsonl").write_bytes(b"".join(lines[:12]) + b'{"key": "torn')
    backend = ScriptedBackend(scripted_cfg(tmp_path).backend)
    go(tmp_path, backend=backend)
    assert backend.requests == len(lines) - 8
    for name in FILES:
        assert digest(shard / f"{name}.jsonl") == digest(baseline.dir / f"{name}.jsonl"), name


def test_changed_settings_are_refused_then_overwritten(
    baseline: SimpleNamespace, tmp_path: Path
) -> None:
    shutil.copytree(baseline.out, tmp_path, dirs_exist_ok=True)
    with pytest.raises(StageStateError, match=r"stage 'chosen' .*changed: \['sampling'\]"):
        go(tmp_path, "chosen.sampling.max_new_tokens=20")
    go(tmp_path, "chosen.sampling.max_new_tokens=20", "overwrite=true")
    kept = rows(tmp_path / SHARD0 / "chosen.jsonl")
    assert all(r["n_tokens"] <= 20 for r in kept)
    with pytest.raises(StageStateError, match="stage 'instructions'"):
        go(tmp_path, "seed=7")


def test_stage_by_stage_equals_all(baseline: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(StageStateError, match="stage 'chunk' has not finished"):
        go(tmp_path, "stage=instructions")
    for stage in ("chunk", "instructions", "rejected", "chosen", "records"):
        go(tmp_path, f"stage={stage}")
    for name in FILES:
        assert digest(tmp_path / SHARD0 / f"{name}.jsonl") == digest(
            baseline.dir / f"{name}.jsonl"
        ), name


def test_shards_then_merge(baseline: SimpleNamespace, tmp_path: Path) -> None:
    go(tmp_path, "shard=0/3")
    with pytest.raises(RuntimeError, match="2 of 3 shards are not finished"):
        go(tmp_path, "stage=merge", "shard=0/3")
    go(tmp_path, "--shard=1/3".lstrip("-"))
    go(tmp_path, "shard=2/3")
    merged = go(tmp_path, "stage=merge", "shard=0/3")
    got = {r["id"]: r for r in rows(tmp_path / "records.jsonl")}
    want = {r["id"]: r for r in rows(baseline.dir / "records.jsonl")}
    assert got == want
    assert merged["records"]["pairs_dropped"] == baseline.report["records"]["pairs_dropped"]
    assert merged["shards"] == 3


def test_over_length_records_are_skipped_and_counted_or_fail(tmp_path: Path) -> None:
    rep = go(tmp_path / "skip", "records.max_seq_length=9000")
    rec = rep["records"]
    assert rec["records_skipped"]["over_length"] > 0
    assert rec["turns_dropped"]["over_length"] >= rec["records_skipped"]["over_length"]
    assert any("over the limit of 9000" in m for m in rec["messages"])
    for r in rows(tmp_path / "skip" / SHARD0 / "records.jsonl"):
        assert r["metadata"]["token_lengths"]["long_chosen"] <= 9000
    with pytest.raises(RecordError, match="over the limit of 9000") as info:
        go(tmp_path / "error", "records.max_seq_length=9000", "records.over_length_policy=error")
    assert info.value.reason == "over_length"


def test_prompts_over_the_model_window_are_counted(tmp_path: Path) -> None:
    rep = go(tmp_path, "backend.max_model_len=1500")
    assert rep["rejected"]["status"]["prompt_too_long"] > 0
    assert rep["records"]["pairs_dropped"]["rejected_prompt_too_long"] > 0
    assert "prompt_too_long" not in rep["chosen"]["status"]


def test_min_turns_drops_small_groups(tmp_path: Path) -> None:
    rep = go(tmp_path, "records.min_turns=4")
    assert rep["records"]["turns_dropped"]["too_few_turns"] > 0
    assert all(len(r["turns"]) == 4 for r in rows(tmp_path / SHARD0 / "records.jsonl"))


def test_schema_round_trip(baseline: SimpleNamespace, tmp_path: Path) -> None:
    """Generated lines -> PreferenceRecord -> JSON lines: byte-identical, metadata included."""
    path = baseline.dir / "records.jsonl"
    records, _ = read_records(path)
    assert records_to_jsonl(records).encode("ascii") == path.read_bytes()
    for raw, rec in zip(rows(path), records):
        assert PreferenceRecord.from_dict(raw).to_dict() == raw == rec.to_dict()
    write_records(tmp_path / "again.jsonl", records)
    again, _ = read_records(tmp_path / "again.jsonl")
    assert again == records and [r.metadata for r in again] == [r.metadata for r in records]


class SurrogateBackend(ScriptedBackend):
    """Answers every chosen prompt with text holding a lone surrogate (what a broken detokenizer
    can emit); the stage file stores it as a JSON escape."""

    def _answer(self, prompt: str) -> tuple[str, str]:
        text, finish = super()._answer(prompt)
        return ("Lone \ud800 here. " + text, finish) if "Reading" in text else (text, finish)


def test_backend_surrogate_output_is_refused_by_the_records_stage(tmp_path: Path) -> None:
    from dg_helpers import small_corpus

    docs = f"input.paths=[{small_corpus(tmp_path / 'docs')}]"
    cfg = scripted_cfg(tmp_path / "out", docs)
    with pytest.raises(RecordError, match=r"chosen\.jsonl, line \d+, record '.+#\d+#\d+': field "
                       r"'text': not encodable as UTF-8 \(lone surrogate at 5\) \[invalid_utf8\]"):
        run(cfg, SurrogateBackend(cfg.backend))
    assert not (tmp_path / "out" / SHARD0 / "records.jsonl").exists()
