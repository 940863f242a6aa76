"""What one global batch holds: tokens, padding, sequence lengths and model FLOPs.

Computed on every rank from the global batch's pair indices alone (the same numbers everywhere,
no collective): the consumed-token count goes into the checkpointed train state, which rank 0
saves, while the loss lives on the last pipeline stage. The FLOPs follow
:mod:`longpo_megatron.flops` at the actual (unpadded) sequence lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from longpo_megatron.data.collate import padded_length, shared_prefix_length
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.sampler import slice_for_dp
from longpo_megatron.data.tokenize import TokenizedPair
from longpo_megatron.flops import (
    Dims,
    forward_flops,
    sequences_forward_flops,
    shared_prefix_pairs,
)
from longpo_megatron.reference.sequences import reference_items


@dataclass(frozen=True)
class BatchStats:
    """One global batch (all DP ranks)."""

    pairs: int
    rows: int
    """Sequences the policy runs (chosen + rejected)."""
    tokens: int
    """Real tokens of every row."""
    padded_tokens: int
    """Positions after padding each micro-batch (what the model actually computes on)."""
    min_len: int
    max_len: int
    policy_forward_flops: float
    """Model FLOPs of one policy forward over the batch."""
    reference_forward_flops: float = 0.0
    """Model FLOPs of the frozen reference's forward within the step (``reference.mode=online``)."""

    def metrics(self) -> dict[str, float]:
        """Logged per step: tokens, padding fraction and row-length statistics."""
        return {
            "tokens": float(self.tokens),
            "padding_fraction": 1.0 - self.tokens / max(self.padded_tokens, 1),
            "seq_len/min": float(self.min_len),
            "seq_len/mean": self.tokens / max(self.rows, 1),
            "seq_len/max": float(self.max_len),
        }


def logit_count(pair: TokenizedPair, nll_scope: str) -> int:
    """Positions of a pair's two rows that go through the output layer (see
    :func:`longpo_megatron.loss.layer.logit_positions`): every response label, plus every real
    label of the chosen row under ``nll_scope=full``."""
    rejected = sum(pair.rejected_response_mask[1:])
    if nll_scope == "full":
        return len(pair.chosen) - 1 + rejected
    return sum(pair.chosen_response_mask[1:]) + rejected


def _padded_tokens(
    pairs: Sequence[TokenizedPair], dp_size: int, micro_batch_size: int, seq_multiple: int
) -> int:
    """Positions of every micro-batch of every DP rank, padded as the collator pads them."""
    total = 0
    for r in range(dp_size):
        mine = slice_for_dp(list(pairs), r, dp_size)
        for lo in range(0, len(mine), micro_batch_size):
            chunk = mine[lo : lo + micro_batch_size]
            longest = max(max(len(p.chosen), len(p.rejected)) for p in chunk)
            total += 2 * len(chunk) * padded_length(longest, seq_multiple)
    return total


def packed_forward_flops(dims: Dims, pairs: Sequence[TokenizedPair], logits: int) -> float:
    """FLOPs of one forward over packed rows [shared prompt | chosen | rejected]
    (``data.shared_prefix``): the prompt once, each branch attending to it and to itself."""
    tokens = attended = 0
    for p in pairs:
        k = shared_prefix_length(p)
        branches = [len(p.chosen) - k, len(p.rejected) - k]
        tokens += k + sum(branches)
        attended += shared_prefix_pairs(k, branches)
    return forward_flops(dims, tokens, attended, logits)


def reference_forward_flops(dims: Dims, dataset: PreferenceDataset, indices, view: str) -> float:
    """FLOPs of the reference's forward over the sequences it scores for ``indices``."""
    items = reference_items(dataset, indices, view)
    lengths = [len(it.seq[0]) for it in items]
    logits = sum(sum(it.seq[1][1:]) for it in items)
    return sequences_forward_flops(dims, lengths, logits)


def global_batch_stats(
    dataset: PreferenceDataset,
    indices: Sequence[int],
    dims: Dims,
    *,
    dp_size: int,
    micro_batch_size: int,
    seq_multiple: int,
    nll_scope: str,
    reference_view: Optional[str] = None,
    shared_prefix: bool = False,
) -> BatchStats:
    """Statistics and model FLOPs of the global batch ``indices`` (``reference_view``: count the
    reference forward too, for the view it scores; ``shared_prefix``: the policy runs packed
    rows, :func:`packed_forward_flops`). Token counts stay those of the two long sequences."""
    pairs = [dataset[i] for i in indices]
    lengths = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    logits = sum(logit_count(p, nll_scope) for p in pairs)
    ref = 0.0
    if reference_view is not None:
        ref = reference_forward_flops(dims, dataset, indices, reference_view)
    return BatchStats(
        pairs=len(pairs),
        rows=len(lengths),
        tokens=sum(lengths),
        padded_tokens=_padded_tokens(pairs, dp_size, micro_batch_size, seq_multiple),
        min_len=min(lengths),
        max_len=max(lengths),
        policy_forward_flops=(
            packed_forward_flops(dims, pairs, logits)
            if shared_prefix
            else sequences_forward_flops(dims, lengths, logits)
        ),
        reference_forward_flops=ref,
    )
