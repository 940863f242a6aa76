"""Linear-time renderer == today's renderer, on every bundled record, for four chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from longpo_megatron.data.records import read_records
from longpo_megatron.data.render import mask_to_spans, render_record, spans_to_mask
from longpo_megatron.data.tokenize import tokenize_record
from longpo_megatron.data.tokenizer import ByteChatTokenizer, HFChatTokenizer
from tests.data.hf_templates import STYLES, make_hf_tokenizer, record_texts

TOY = Path(__file__).resolve().parents[2] / "data" / "toy" / "preference.jsonl"
BIG = 10**9


@pytest.fixture(scope="module")
def records():
    return read_records(TOY)[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    texts = record_texts(TOY)
    return {s: make_hf_tokenizer(root / s, s, texts) for s in STYLES}


def _assert_same(records, tok) -> None:
    for i, rec in enumerate(records):
        want = tokenize_record(rec, i, tok, BIG, BIG)
        got = render_record(rec, i, tok, BIG, BIG)
        assert got == want, f"record {rec.id}"
        assert any(want.chosen_response_mask) and not all(want.chosen_response_mask)


def test_byte_renderer_identical(records) -> None:
    _assert_same(records, ByteChatTokenizer())


@pytest.mark.parametrize("style", sorted(STYLES))
def test_hf_renderer_identical(records, hf_dir, style) -> None:
    tok = HFChatTokenizer(hf_dir[style])
    assert tok.is_fast
    _assert_same(records, tok)


def test_hf_renderer_tokenizes_once(records, hf_dir, monkeypatch) -> None:
    """One tokenization per sequence, whatever the number of turns (the linear-time claim)."""
    tok = HFChatTokenizer(hf_dir["qwen2"])
    calls = []
    real = tok.encode_with_offsets
    monkeypatch.setattr(tok, "encode_with_offsets", lambda t: calls.append(len(t)) or real(t))
    monkeypatch.setattr(tok, "encode", lambda t: pytest.fail("per-message encode"))
    rec = records[0]
    render_record(rec, 0, tok, BIG, BIG)
    assert len(calls) == 2 + 2 * len(rec.turns)


def test_over_length_same_error(records) -> None:
    tok = ByteChatTokenizer()
    for limits in ((100, BIG), (BIG, 50)):
        with pytest.raises(ValueError) as want:
            tokenize_record(records[0], 0, tok, *limits)
        with pytest.raises(ValueError) as got:
            render_record(records[0], 0, tok, *limits)
        assert str(got.value) == str(want.value)


def test_spans_round_trip() -> None:
    for mask in ([], [True], [False, True, True, False, True], [False] * 3 + [True] * 4):
        spans = mask_to_spans(mask)
        assert spans_to_mask(spans, len(mask)) == mask
    assert mask_to_spans([False, True, True, False, True]).tolist() == [1, 3, 4, 5]
