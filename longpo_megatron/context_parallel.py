"""Context parallelism: megatron's load-balanced sequence split and the K/V exchange.

A sequence of length S (a multiple of 2·CP) is cut into 2·CP equal chunks; CP rank r holds
chunks r and 2·CP−1−r, so every rank gets the same share of causal-attention work. Tokens,
labels, loss masks and position ids are split the same way; per-row scalars (reference scores)
are not split. Keys/values are all-gathered over the CP group for attention (see
``model/attention.py`` for why all-gather and not a ring on the CPU path).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from longpo_megatron.model.attention_mask import AttentionMask

SEQUENCE_KEYS = (
    "tokens",
    "position_ids",
    "labels",
    "response_mask",
    "real_mask",
    "ref_token_logps",
    "branch",
)
"""Micro-batch entries that have a sequence dimension (dim 1) and are split across CP ranks."""


def local_token_index(seq_len: int, cp_rank: int, cp_size: int, device=None) -> Tensor:
    """Global indices (in local order) of the tokens CP rank ``cp_rank`` holds."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*context_parallel_size="
            f"{2 * cp_size} (pad micro-batches to data layout's seq_multiple)"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    last_chunk = 2 * cp_size - 1 - cp_rank
    second = torch.arange(last_chunk * chunk, (last_chunk + 1) * chunk, device=device)
    return torch.cat([first, second])


def split_batch(batch: dict[str, Any], cp_rank: int, cp_size: int) -> dict[str, Any]:
    """This CP rank's part of a micro-batch, with an ``attention_mask`` naming its tokens.

    Packed rows (``branch`` present, ``data.shared_prefix``) carry their layout in the mask at
    any CP size: causal in position order, branches apart. Their branches sit at the end of the
    row and are split with the tokens, so the split stays balanced."""
    if cp_size == 1:
        if "branch" in batch:
            return dict(batch, attention_mask=packed_attention_mask(batch))
        return batch
    seq_len = batch["tokens"].shape[1]
    index = local_token_index(seq_len, cp_rank, cp_size, device=batch["tokens"].device)
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in batch:
            out[key] = batch[key].index_select(1, index)
    rows = batch["tokens"].shape[0]
    if "branch" in batch:
        mask = packed_attention_mask(batch)
    else:
        mask = AttentionMask.causal(rows, seq_len, index.device)
    out["attention_mask"] = mask.with_queries(index)
    return out


def packed_attention_mask(batch: dict[str, Any]) -> AttentionMask:
    """The global mask of packed rows: order = position ids, branch = branch ids."""
    return AttentionMask(order=batch["position_ids"], branch=batch["branch"])


class _GatherSequence(torch.autograd.Function):
    """All-gather a ``[s_local, ...]`` tensor into global token order ``[S, ...]``.

    Backward sums every rank's gradient for the full sequence (all ranks' queries attend to
    these keys) and returns this rank's own tokens' share.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, group: dist.ProcessGroup) -> Tensor:  # noqa: D102
        size = group.size()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        full = x.new_empty((x.shape[0] * size, *x.shape[1:]))
        for rank, part in enumerate(parts):
            full.index_copy_(0, local_token_index(full.shape[0], rank, size, x.device), part)
        ctx.group, ctx.index = group, index
        return full

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.index_select(0, ctx.index), None, None


def gather_sequence(x: Tensor, index: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Full-sequence view of a CP-split tensor (identity without CP)."""
    if group is None or group.size() == 1:
        return x
    return _GatherSequence.apply(x, index, group)
