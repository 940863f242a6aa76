"""Rendering samples with the evaluated model's own chat template and tokenizer.

The same :class:`~longpo_megatron.data.tokenizer.ChatTokenizer` code that renders training data
renders evaluation prompts (``byte`` or a local HF tokenizer directory), so the HF and Megatron
paths see identical token ids: a prompt is the single user turn plus the generation prompt, and a
scored answer is that prompt followed by the answer and its end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

from longpo_megatron.data.tokenizer import ChatTokenizer, render_chat
from longpo_megatron.eval.tasks import Count, Sample

Row = tuple[list[int], list[bool]]
"""Token ids and the response mask (True on the scored answer tokens and their end of turn)."""


def token_counter(tokenizer: ChatTokenizer) -> Count:
    """Tokens of plain text (no special tokens) in ``tokenizer``."""
    return lambda text: len(tokenizer.encode(text))


def answer_row(tokenizer: ChatTokenizer, prompt: str, answer: str) -> Row:
    """``prompt`` as the user turn, ``answer`` as the assistant turn (ids, response mask)."""
    ids, mask = render_chat(tokenizer, [(prompt, answer)])
    return list(ids), list(mask)


def prompt_ids(tokenizer: ChatTokenizer, prompt: str) -> list[int]:
    """Ids of the user turn plus the generation prompt (what a model continues greedily)."""
    ids, mask = answer_row(tokenizer, prompt, "x")
    return ids[: mask.index(True)]


def choice_rows(tokenizer: ChatTokenizer, sample: Sample) -> list[Row]:
    """One scored row per multiple-choice option of ``sample`` (log-likelihood mode)."""
    return [answer_row(tokenizer, sample.prompt, c) for c in sample.choices]


def template_overhead(tokenizer: ChatTokenizer) -> int:
    """Tokens the chat template adds around a prompt (subtracted from the target length)."""
    return len(prompt_ids(tokenizer, ""))


def rows_for(tokenizer: ChatTokenizer, samples: Sequence[Sample]) -> list[Row]:
    """Every option row of every sample, sample by sample."""
    return [row for s in samples for row in choice_rows(tokenizer, s)]
