"""Stage ``records``: filter answer pairs, group turns into multi-turn records, apply limits.

Inputs are the finished stage files of one shard; the output is schema-v1 records
(``data.records``) plus counts of every pair, turn and record that did not make it, by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from longpo_megatron.data.records import PreferenceRecord, RecordError, Turn
from longpo_megatron.data.tokenize import tokenize_record
from longpo_megatron.data.tokenizer import ChatTokenizer
from longpo_megatron.datagen.config import DatagenConfig
from longpo_megatron.datagen.filters import AnswerFilter

BASIC_REASONS = ("empty", "truncated", "over_long")
"""Rules applied to rejected answers even with filters.check_rejected=false."""


@dataclass
class GroupingReport:
    """Counts of the records stage."""

    pairs: int = 0
    """Instruction turns with both answers generated (or refused for length)."""
    pairs_kept: int = 0
    pairs_dropped: Counter = field(default_factory=Counter)
    """``chosen_<reason>`` / ``rejected_<reason>`` / ``identical`` -> pairs."""
    turns_dropped: Counter = field(default_factory=Counter)
    """``too_few_turns`` / ``over_length`` -> turns (kept pairs that reached no record)."""
    records: int = 0
    records_skipped: Counter = field(default_factory=Counter)
    """``over_length`` -> records."""
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "pairs": self.pairs,
            "pairs_kept": self.pairs_kept,
            "pairs_dropped": dict(sorted(self.pairs_dropped.items())),
            "turns_dropped": dict(sorted(self.turns_dropped.items())),
            "records": self.records,
            "records_skipped": dict(sorted(self.records_skipped.items())),
            "messages": self.messages,
        }


@dataclass
class TurnDraft:
    """A kept pair on its way into a record."""

    turn: Turn
    chunk_index: int
    chosen_tokens: int
    rejected_tokens: int


def pair_reason(
    filt: AnswerFilter, chosen: dict[str, Any], rejected: dict[str, Any], check_rejected: bool
) -> Optional[str]:
    """Why a generated pair is unusable (None = keep)."""
    for side, row in (("chosen", chosen), ("rejected", rejected)):
        if row["status"] != "ok":
            return f"{side}_{row['status']}"
        reason = filt.reason(row["text"], row["n_tokens"], row["finish_reason"])
        if side == "rejected" and reason == "truncated" and filt.cfg.keep_truncated_rejected:
            reason = None
        if reason and (side == "chosen" or check_rejected or reason in BASIC_REASONS):
            return f"{side}_{reason}"
    if filt.cfg.drop_identical and chosen["text"].strip() == rejected["text"].strip():
        return "identical"
    return None


def document_turns(
    doc: dict[str, Any],
    instructions: dict[str, dict[str, Any]],
    chosen: dict[str, dict[str, Any]],
    rejected: dict[str, dict[str, Any]],
    filt: AnswerFilter,
    cfg: DatagenConfig,
    report: GroupingReport,
) -> list[TurnDraft]:
    """The kept turns of one document, in chunk order."""
    text = doc["text"]
    drafts: list[TurnDraft] = []
    for index, (start, end, _n) in enumerate(doc["chunks"]):
        row = instructions[f"{doc['doc_id']}#{index}"]
        for q, instruction in enumerate(row.get("instructions", [])):
            key = f"{doc['doc_id']}#{index}#{q}"
            c, r = chosen[key], rejected[key]
            report.pairs += 1
            reason = pair_reason(filt, c, r, cfg.filters.check_rejected)
            if reason:
                report.pairs_dropped[reason] += 1
                continue
            report.pairs_kept += 1
            turn = Turn(instruction["text"], text[start:end], c["text"], r["text"])
            drafts.append(TurnDraft(turn, index, c["n_tokens"], r["n_tokens"]))
    return drafts


def make_record(
    doc: dict[str, Any],
    group: list[TurnDraft],
    number: int,
    generator: dict[str, Any],
    cfg: DatagenConfig,
    tokenizer: ChatTokenizer,
) -> PreferenceRecord:
    """One record with metadata and training token lengths; RecordError when over a limit."""
    rec_id = f"{cfg.records.id_prefix}{doc['doc_id']}-{number}"
    record = PreferenceRecord(rec_id, doc["text"], tuple(d.turn for d in group))
    limits = cfg.records
    pair = tokenize_record(record, 0, tokenizer, limits.max_seq_length, limits.max_ref_seq_length)
    metadata = {
        "source": doc["source"],
        "document_id": doc["doc_id"],
        "chunks": [d.chunk_index for d in group],
        "generator": generator,
        "stage": limits.training_stage,
        "token_lengths": {
            "tokenizer": tokenizer.name,
            "long_chosen": len(pair.chosen),
            "long_rejected": len(pair.rejected),
            "short_chosen": [len(ids) for ids, _ in pair.ref_chosen],
            "short_rejected": [len(ids) for ids, _ in pair.ref_rejected],
            "generator_document": doc["n_tokens"],
            "generator_chunks": [doc["chunks"][d.chunk_index][2] for d in group],
            "generator_chosen": [d.chosen_tokens for d in group],
            "generator_rejected": [d.rejected_tokens for d in group],
        },
    }
    return PreferenceRecord(rec_id, doc["text"], record.turns, metadata)


def build_records(
    docs: list[dict[str, Any]],
    stage_rows: dict[str, dict[str, dict[str, Any]]],
    generator: dict[str, Any],
    cfg: DatagenConfig,
    tokenizer: ChatTokenizer,
) -> tuple[list[PreferenceRecord], GroupingReport]:
    """Filter, group and limit; over-length records error or are counted per the policy."""
    report = GroupingReport()
    filt = AnswerFilter(cfg.filters)
    per = cfg.records.turns_per_record
    records: list[PreferenceRecord] = []
    for doc in docs:
        drafts = document_turns(
            doc,
            stage_rows["instructions"],
            stage_rows["chosen"],
            stage_rows["rejected"],
            filt,
            cfg,
            report,
        )
        for number, start in enumerate(range(0, len(drafts), per)):
            group = drafts[start : start + per]
            if len(group) < cfg.records.min_turns:
                report.turns_dropped["too_few_turns"] += len(group)
                continue
            try:
                records.append(make_record(doc, group, number, generator, cfg, tokenizer))
            except RecordError as err:
                if cfg.records.over_length_policy == "error":
                    raise
                report.records_skipped[err.reason] += 1
                report.turns_dropped[err.reason] += len(group)
                report.messages.append(str(err))
    report.records = len(records)
    return records, report
