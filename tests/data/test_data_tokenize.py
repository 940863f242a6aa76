"""Tokenization of records: long/short layout by hand, over-length errors and skips."""

from __future__ import annotations

import pytest

from longpo_megatron.data.records import PreferenceRecord, RecordError, Turn
from longpo_megatron.data.tokenize import tokenize_record, tokenize_records
from longpo_megatron.data.tokenizer import ByteChatTokenizer

BOS, EOS, USER, ASSISTANT = 257, 258, 259, 260
TOK = ByteChatTokenizer()


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def record(rec_id: str = "r-1", rejected_1: str = "n1") -> PreferenceRecord:
    turns = (Turn("q0", "c0", "y0", "n0"), Turn("q1", "c1", "y1", rejected_1))
    return PreferenceRecord(rec_id, "DOC", turns, line=7)


def test_long_and_short_layout() -> None:
    pair = tokenize_record(record(), 5, TOK, 1024, 512)
    expect = [BOS, USER, *b("DOC\n\nq0"), EOS, ASSISTANT, *b("y0"), EOS] + [
        USER,
        *b("q1"),
        EOS,
        ASSISTANT,
        *b("y1"),
        EOS,
    ]
    assert pair.chosen == expect
    assert pair.rejected == [n if n != ord("y") else ord("n") for n in expect]
    marked = [i for i, m in enumerate(pair.chosen_response_mask) if m]
    assert marked == [11, 12, 13, 19, 20, 21]  # "y0" + eos, "y1" + eos
    assert pair.rejected_response_mask == pair.chosen_response_mask
    assert pair.index == 5 and pair.record_id == "r-1"
    assert len(pair.ref_chosen) == len(pair.ref_rejected) == 2
    ids, mask = pair.ref_chosen[1]
    assert ids == [BOS, USER, *b("c1\n\nq1"), EOS, ASSISTANT, *b("y1"), EOS]
    assert [i for i, m in enumerate(mask) if m] == [10, 11, 12]
    assert pair.ref_rejected[0][0] == [BOS, USER, *b("c0\n\nq0"), EOS, ASSISTANT, *b("n0"), EOS]


def test_over_length_long_sequence_is_an_error() -> None:
    n = len(tokenize_record(record(), 0, TOK, 1024, 512).chosen)
    with pytest.raises(RecordError) as info:
        tokenize_record(record(), 0, TOK, n - 1, 512)
    msg = str(info.value)
    assert info.value.reason == "over_length" and "'r-1'" in msg and "line 7" in msg
    assert f"chosen long sequence has {n} tokens" in msg and f"limit of {n - 1}" in msg


def test_over_length_short_sequence_names_turn() -> None:
    rec = record(rejected_1="a much longer rejected answer")
    short_len = len(tokenize_record(rec, 0, TOK, 1024, 512).ref_rejected[1][0])
    with pytest.raises(RecordError, match="rejected short reference sequence of turn 1") as info:
        tokenize_record(rec, 0, TOK, 1024, short_len - 1)
    assert f"{short_len} tokens" in str(info.value)


def test_tokenize_records_policies() -> None:
    recs = [record("a"), record("b", rejected_1="x" * 100), record("c")]
    limit = len(tokenize_record(recs[0], 0, TOK, 1024, 512).rejected)
    with pytest.raises(RecordError, match="'b'"):
        tokenize_records(recs, TOK, limit, 512)
    pairs, report = tokenize_records(recs, TOK, limit, 512, policy="skip")
    assert [(p.index, p.record_id) for p in pairs] == [(0, "a"), (1, "c")]
    assert dict(report.skipped) == {"over_length": 1} and report.problems == [(7, "over_length")]
    assert report.records_ok == 2
    with pytest.raises(ValueError, match="policy"):
        tokenize_records(recs, TOK, limit, 512, policy="truncate")
