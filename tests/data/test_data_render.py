"""Linear-time renderer == today's renderer, on every bundled record, for four chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from longpo_megatron.data.records import read_records
from longpo_megatron.data.render import mask_to_spans, render_fast, render_record, spans_to_mask
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


@pytest.mark.parametrize(
    "template",
    [
        # a token straddles the prompt/response boundary ("hello" + "world" -> one unknown word)
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<|end|>"
        "{% endif %}{% endfor %}",
        # the rendering of a prompt is not a text prefix of the rendering with the response
        "{% if messages[-1]['role'] == 'assistant' %}<|sep|>{% endif %}{% for m in messages %}"
        "{{ m['content'] }} <|end|>{% endfor %}",
    ],
    ids=["straddle", "rewrites"],
)
def test_unstable_templates_refused_like_today(tmp_path, template) -> None:
    from tests.data.test_data_tokenizer import _save_tiny_hf

    tok = HFChatTokenizer(_save_tiny_hf(tmp_path / "tok", template))
    pairs = [("hello", "world")]
    with pytest.raises(ValueError, match="not prefix-stable") as want:
        tok.render_turns(pairs)
    with pytest.raises(ValueError, match="not prefix-stable") as got:
        render_fast(tok, pairs)
    assert str(got.value) == str(want.value)
