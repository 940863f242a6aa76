"""Linear-time rendering of records: the same ids and masks as :func:`~.tokenize.tokenize_record`.

Today's chat rendering (:meth:`HFChatTokenizer.render_turns`) tokenizes the whole conversation
again after every message, so a long sequence costs turns x document. Here each conversation is
rendered to TEXT once per message (cheap string work), tokenized ONCE with character offsets, and
every message boundary is located in that single tokenization:

- every partial rendering must be a string prefix of the final one (else today's slow, checking
  renderer runs, and raises exactly as it does today when the template is not prefix-stable);
- a token that straddles a boundary means the partial rendering does not tokenize to a token
  prefix: refused with today's "not prefix-stable" message. With no straddling token the
  prefix's tokenization equals the first tokens of the whole (BPE merges and unigram Viterbi
  paths never cross an unstraddled boundary), so the result equals today's renderer's; the
  tests check it on every bundled record for byte, Mistral-, Llama- and Qwen2-style templates.

The byte tokenizer's template is piecewise by construction; its first user turn (the document)
is encoded once per record and shared by the chosen and rejected sequences.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from longpo_megatron.data.records import PreferenceRecord
from longpo_megatron.data.tokenize import (
    ShortSeq,
    TokenizedPair,
    assemble_pair,
    long_pairs,
)
from longpo_megatron.data.tokenizer import (
    ByteChatTokenizer,
    ChatTokenizer,
    HFChatTokenizer,
    Pairs,
    render_chat,
)


def _byte_render(tok: ByteChatTokenizer, pairs: Pairs, first: list[int] | None = None) -> ShortSeq:
    """The byte template, piece by piece; ``first`` = precomputed ids of the first user text."""
    ids, mask = [tok.BOS], [False]
    for k, (user, assistant) in enumerate(pairs):
        body = first if (k == 0 and first is not None) else tok.encode(user)
        prompt = [tok.USER, *body, tok.EOS, tok.ASSISTANT]
        response = [*tok.encode(assistant), tok.EOS]
        ids += prompt + response
        mask += [False] * len(prompt) + [True] * len(response)
    return ids, mask


def _boundary(ends: list[int], starts: list[int], cut: int) -> int | None:
    """Tokens wholly before character ``cut``; None when a token straddles it."""
    n = bisect.bisect_right(ends, cut)
    if n < len(starts) and starts[n] < cut and ends[n] > cut:
        return None
    return n


def _hf_render(tok: HFChatTokenizer, pairs: Pairs) -> ShortSeq:
    """Render once, tokenize once, locate every message boundary by character offsets."""
    messages: list[dict[str, str]] = []
    cuts: list[tuple[int, int]] = []
    texts: list[str] = []
    for user, assistant in pairs:
        messages.append({"role": "user", "content": user})
        texts.append(tok.render_text(messages, generation_prompt=True))
        messages.append({"role": "assistant", "content": assistant})
        texts.append(tok.render_text(messages, generation_prompt=False))
        cuts.append((len(texts[-2]), len(texts[-1])))
    final = texts[-1]
    lengths = [len(t) for t in texts]
    if lengths != sorted(lengths) or not all(final.startswith(t) for t in texts[:-1]):
        return render_chat(tok, pairs)  # not textually prefix-stable: today's path decides
    ids, offsets = tok.encode_with_offsets(final)
    starts = [s for s, _ in offsets]
    ends = [max(e, s) for s, e in offsets]
    for i in range(1, len(ends)):  # offsets are non-decreasing; keep bisect well defined
        ends[i] = max(ends[i], ends[i - 1])
    mask: list[bool] = []
    done = 0
    for turn, (p_cut, f_cut) in enumerate(cuts):
        # today's renderer checks prompt_k against full_k ("the assistant response" of turn k),
        # then full_k against prompt_k+1 ("the user message" of turn k+1)
        n_prompt, n_full = _boundary(ends, starts, p_cut), _boundary(ends, starts, f_cut)
        if n_prompt is None:
            raise tok.not_prefix_stable(turn, "the assistant response")
        if n_full is None:
            raise tok.not_prefix_stable(turn + 1, "the user message")
        mask += [False] * (n_prompt - done)
        mask += tok._span_mask(ids[n_prompt:n_full], turn)
        done = n_full
    if done != len(ids):
        mask += [False] * (len(ids) - done)
    return ids, mask


def render_fast(tok: ChatTokenizer, pairs: Pairs, first: list[int] | None = None) -> ShortSeq:
    """:func:`render_chat` in time linear in the conversation's length."""
    if isinstance(tok, ByteChatTokenizer):
        return _byte_render(tok, pairs, first)
    if isinstance(tok, HFChatTokenizer) and tok.is_fast:
        return _hf_render(tok, pairs)
    return render_chat(tok, pairs)


def render_record(
    record: PreferenceRecord,
    index: int,
    tokenizer: ChatTokenizer,
    max_seq_length: int,
    max_ref_seq_length: int,
) -> TokenizedPair:
    """Same result and errors as :func:`~.tokenize.tokenize_record`, in linear time."""
    first = None
    if isinstance(tokenizer, ByteChatTokenizer):
        first = tokenizer.encode(long_pairs(record, "chosen")[0][0])

    def render(pairs: Pairs, short: bool = False) -> ShortSeq:
        return render_fast(tokenizer, pairs, None if short else first)

    return assemble_pair(record, index, render, max_seq_length, max_ref_seq_length)


def mask_to_spans(mask: Sequence[bool]) -> np.ndarray:
    """Runs of True as flat int32 ``[start0, end0, start1, end1, ...]`` (end exclusive)."""
    m = np.zeros(len(mask) + 2, dtype=np.int8)
    m[1:-1] = np.asarray(mask, dtype=np.int8)
    return np.flatnonzero(np.diff(m)).astype(np.int32)


def spans_to_mask(spans: Sequence[int], length: int) -> list[bool]:
    """Inverse of :func:`mask_to_spans` (a per-token list, as collation expects)."""
    mask = np.zeros(length, dtype=bool)
    for k in range(0, len(spans), 2):
        mask[int(spans[k]) : int(spans[k + 1])] = True
    return mask.tolist()
