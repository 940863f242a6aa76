"""Tokenizers: byte template by hand, HF wrapper on a tiny tokenizer built here (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from longpo_megatron.data.tokenizer import (
    ByteChatTokenizer,
    ChatTokenizer,
    HFChatTokenizer,
    build_tokenizer,
    render_chat,
)

BOS, EOS, USER, ASSISTANT = 257, 258, 259, 260

TEMPLATE = (
    "<|bos|>{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}<|end|><|sep|>"
    "{% else %}<|assistant|> {{ m['content'] }}<|end|><|sep|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Emits a marker at the very start only once an assistant turn closes the conversation: the
# rendering of a prompt is then not a prefix of the rendering with the response.
UNSTABLE = "{% if messages[-1]['role'] == 'assistant' %}<|sep|>{% endif %}" + TEMPLATE
SPECIALS = ["[UNK]", "<|pad|>", "<|bos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|sep|>"]
WORDS = ["hello", "world", "yes", "no"]


def test_byte_round_trip() -> None:
    tok = ByteChatTokenizer()
    text = "Grüße, 世界! plain ascii\n\ttabs"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("A") == [65]
    assert tok.vocab_size == 264 and all(tok.vocab_size % k == 0 for k in (2, 4, 8))
    assert (tok.pad_id, tok.eos_id) == (256, 258)
    assert isinstance(tok, ChatTokenizer)


def test_byte_template_and_mask_single_turn() -> None:
    ids, mask = render_chat(ByteChatTokenizer(), [("hi", "yo")])
    assert ids == [BOS, USER, ord("h"), ord("i"), EOS, ASSISTANT, ord("y"), ord("o"), EOS]
    assert mask == [False] * 6 + [True] * 3


def test_byte_template_and_mask_two_turns() -> None:
    tok = ByteChatTokenizer()
    ids, mask = render_chat(tok, [("a", "b"), ("c", "d")])
    assert ids == [BOS, USER, 97, EOS, ASSISTANT, 98, EOS, USER, 99, EOS, ASSISTANT, 100, EOS]
    assert [i for i, m in enumerate(mask) if m] == [5, 6, 11, 12]
    assert tok.decode(ids) == "<bos><user>a<eos><assistant>b<eos><user>c<eos><assistant>d<eos>"
    assert tok.decode(ids, skip_special=True) == "abcd"


def test_render_chat_needs_a_turn() -> None:
    with pytest.raises(ValueError, match="at least one"):
        render_chat(ByteChatTokenizer(), [])


def _save_tiny_hf(path: Path, template: str | None) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|sep|>"],
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(path))
    return path


def test_hf_tokenizer_spans_by_hand(tmp_path: Path) -> None:
    tok = build_tokenizer(str(_save_tiny_hf(tmp_path / "tiny", TEMPLATE)))
    assert isinstance(tok, HFChatTokenizer)
    v = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (v["<|pad|>"], v["<|end|>"], 11)
    assert tok.encode("hello world") == [v["hello"], v["world"]]
    ids, mask = render_chat(tok, [("hello world", "yes"), ("world", "no")])
    names = [
        "<|bos|>",
        "<|user|>",
        "hello",
        "world",
        "<|end|>",
        "<|sep|>",
        "<|assistant|>",
        "yes",
        "<|end|>",
        "<|sep|>",
        "<|user|>",
        "world",
        "<|end|>",
        "<|sep|>",
        "<|assistant|>",
        "no",
        "<|end|>",
        "<|sep|>",
    ]
    assert ids == [v[n] for n in names]
    # The response and its closing end-of-turn token; the template's <|sep|> glue is not.
    assert [i for i, m in enumerate(mask) if m] == [7, 8, 15, 16]


def test_hf_tokenizer_not_prefix_stable(tmp_path: Path) -> None:
    path = _save_tiny_hf(tmp_path / "unstable", UNSTABLE)
    tok = build_tokenizer(str(path))
    with pytest.raises(ValueError, match="not prefix-stable") as info:
        render_chat(tok, [("hello", "yes")])
    assert str(path) in str(info.value)


def test_hf_tokenizer_without_template(tmp_path: Path) -> None:
    path = _save_tiny_hf(tmp_path / "plain", None)
    with pytest.raises(ValueError, match="no chat template"):
        build_tokenizer(str(path))


def test_build_tokenizer_missing_path(tmp_path: Path) -> None:
    assert isinstance(build_tokenizer("byte"), ByteChatTokenizer)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_tokenizer(str(tmp_path / "does-not-exist"))
