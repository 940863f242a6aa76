"""Records to token ids: the long policy sequences and the short per-turn reference sequences.

Long sequence (policy): first user turn = document + "\\n\\n" + instruction_1, later user turns
= instruction_i; assistant turns = chosen_i (chosen sequence) or rejected_i (rejected sequence).
Short sequence of turn i (reference): user = short_context_i + "\\n\\n" + instruction_i,
assistant = response_i. Sequences over a length limit are never truncated: they are an error
(or, with the skip policy, counted and skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from longpo_megatron.data.records import POLICIES, DataReport, PreferenceRecord, RecordError
from longpo_megatron.data.tokenizer import ChatTokenizer, render_chat

ShortSeq = tuple[list[int], list[bool]]
"""A short reference sequence: (ids, per-token response mask)."""


@dataclass
class TokenizedPair:
    """One chosen/rejected pair ready for collation (masks are per TOKEN, not per label)."""

    index: int
    """Dataset index of the pair."""
    chosen: list[int]
    rejected: list[int]
    chosen_response_mask: list[bool]
    rejected_response_mask: list[bool]
    ref_chosen: list[ShortSeq] = field(default_factory=list)
    """Per turn: short-context sequence with the chosen response."""
    ref_rejected: list[ShortSeq] = field(default_factory=list)
    """Per turn: short-context sequence with the rejected response."""
    record_id: str = ""
    shared_prefix: Optional[int] = None
    """Tokens held once in the packed layout (:func:`shared_prefix_length`): stored by
    prepared datasets (format v2) and set when tokenized; None = computed when packed."""


def shared_prefix_length(pair: TokenizedPair) -> int:
    """Tokens of ``pair`` held once in the packed layout: the longest common token prefix of
    its chosen and rejected long sequences, cut at the first response token of either (so the
    shared part is document + first instruction and never holds a response label), minus one:
    the last common token starts each branch, because it predicts each branch's first token.
    List slices and numpy compare the tokens (no Python loop: ~ms at 128K tokens)."""
    limit = min(
        len(pair.chosen),
        len(pair.rejected),
        _first_true(pair.chosen_response_mask),
        _first_true(pair.rejected_response_mask),
    )
    if pair.chosen[:limit] == pair.rejected[:limit]:
        common = limit
    else:
        diff = np.asarray(pair.chosen[:limit]) != np.asarray(pair.rejected[:limit])
        common = int(diff.argmax())
    return max(common - 1, 0)


def _first_true(mask: Sequence[bool]) -> int:
    """Index of the first true entry of ``mask`` (its length when none is)."""
    seq = mask if isinstance(mask, list) else list(mask)
    try:
        return seq.index(True)
    except ValueError:
        return len(seq)


def long_pairs(record: PreferenceRecord, side: str) -> list[tuple[str, str]]:
    """(user, assistant) pairs of the long sequence; ``side`` is ``chosen`` or ``rejected``."""
    pairs = []
    for i, turn in enumerate(record.turns):
        user = f"{record.document}\n\n{turn.instruction}" if i == 0 else turn.instruction
        pairs.append((user, getattr(turn, side)))
    return pairs


def short_pairs(record: PreferenceRecord, turn_index: int, side: str) -> list[tuple[str, str]]:
    """The single (user, assistant) pair of turn ``turn_index``'s short reference sequence."""
    turn = record.turns[turn_index]
    return [(f"{turn.short_context}\n\n{turn.instruction}", getattr(turn, side))]


def _over_length(record: PreferenceRecord, what: str, length: int, limit: int) -> RecordError:
    return RecordError(
        "over_length",
        f"{what} has {length} tokens, over the limit of {limit} (records are never truncated)",
        line=record.line,
        record_id=record.id,
    )


def tokenize_record(
    record: PreferenceRecord,
    index: int,
    tokenizer: ChatTokenizer,
    max_seq_length: int,
    max_ref_seq_length: int,
) -> TokenizedPair:
    """Tokenize one record; raises :class:`RecordError` (reason ``over_length``) when too long."""
    return assemble_pair(
        record,
        index,
        lambda pairs, short=False: render_chat(tokenizer, pairs),
        max_seq_length,
        max_ref_seq_length,
    )


def assemble_pair(
    record: PreferenceRecord,
    index: int,
    render: Callable[..., ShortSeq],
    max_seq_length: int,
    max_ref_seq_length: int,
) -> TokenizedPair:
    """Both long sequences and every turn's short ones of ``record``, each rendered by
    ``render(pairs, short=...)`` and checked against its length limit (records are never
    truncated). Shared by today's renderer and the linear-time one (:mod:`.render`)."""
    long: dict[str, ShortSeq] = {}
    for side in ("chosen", "rejected"):
        ids, mask = render(long_pairs(record, side))
        if len(ids) > max_seq_length:
            raise _over_length(record, f"{side} long sequence", len(ids), max_seq_length)
        long[side] = (ids, mask)
    short: dict[str, list[ShortSeq]] = {"chosen": [], "rejected": []}
    for i in range(len(record.turns)):
        for side in ("chosen", "rejected"):
            ids, mask = render(short_pairs(record, i, side), short=True)
            if len(ids) > max_ref_seq_length:
                what = f"{side} short reference sequence of turn {i}"
                raise _over_length(record, what, len(ids), max_ref_seq_length)
            short[side].append((ids, mask))
    pair = TokenizedPair(
        index=index,
        chosen=long["chosen"][0],
        rejected=long["rejected"][0],
        chosen_response_mask=long["chosen"][1],
        rejected_response_mask=long["rejected"][1],
        ref_chosen=short["chosen"],
        ref_rejected=short["rejected"],
        record_id=record.id,
    )
    pair.shared_prefix = shared_prefix_length(pair)
    return pair


def tokenize_records(
    records: Sequence[PreferenceRecord],
    tokenizer: ChatTokenizer,
    max_seq_length: int,
    max_ref_seq_length: int,
    policy: str = "error",
    report: Optional[DataReport] = None,
) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenize records in order; kept pairs get contiguous dataset indices 0..n-1.

    ``policy="error"`` re-raises the first over-length record; ``"skip"`` counts it in the report
    (``report.records_ok`` is updated to the number of kept pairs).
    """
    if policy not in POLICIES:
        raise ValueError(f"over-length policy must be one of {POLICIES}, got {policy!r}")
    report = report if report is not None else DataReport()
    pairs: list[TokenizedPair] = []
    for record in records:
        try:
            pair = tokenize_record(
                record, len(pairs), tokenizer, max_seq_length, max_ref_seq_length
            )
        except RecordError as err:
            located = err.located(path=report.path or None)
            if policy == "error":
                raise located from None
            report.add_skip(located)
            continue
        pairs.append(pair)
    report.records_ok = len(pairs)
    return pairs, report
