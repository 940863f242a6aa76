"""Log-probabilities of label tokens from a vocab-parallel output layer, in chunks.

Only positions whose labels count are projected, ``chunk_size`` at a time, and logits are
recomputed in backward instead of stored: peak memory is ``chunk_size × vocab/TP`` whatever the
sequence length (512K tokens included). Each TP rank holds a contiguous vocabulary slice.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import Tensor


def _chunk_stats(
    h: Tensor, weight: Tensor, targets: Tensor, vocab_start: int, group: Optional[dist.ProcessGroup]
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of one chunk, their global log-sum-exp and the global target logit."""
    logits = (h @ weight.t()).to(_compute_dtype(h))
    vmax = logits.max(dim=-1).values
    if group is not None and group.size() > 1:
        dist.all_reduce(vmax, op=dist.ReduceOp.MAX, group=group)
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < weight.shape[0])
    safe = torch.where(in_shard, local, torch.zeros_like(local))
    tgt = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * in_shard
    stats = torch.stack([(logits - vmax.unsqueeze(-1)).exp().sum(-1), tgt])
    if group is not None and group.size() > 1:
        dist.all_reduce(stats, group=group)
    lse = stats[0].log() + vmax
    return logits, lse, stats[1]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """Softmax arithmetic in fp32 (fp64 kept for fp64 inputs): bf16 logits lose too much."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChunkedLogProbs(torch.autograd.Function):
    """logp[n] = logit[n, target[n]] − logsumexp(logit[n, :]) over the full (sharded) vocab."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, chunk, group):  # noqa: D102
        out = torch.empty(hidden.shape[0], dtype=_compute_dtype(hidden), device=hidden.device)
        lse_all = torch.empty_like(out)
        for lo in range(0, hidden.shape[0], chunk):
            sl = slice(lo, lo + chunk)
            _, lse, tgt = _chunk_stats(hidden[sl], weight, targets[sl], vocab_start, group)
            out[sl] = tgt - lse
            lse_all[sl] = lse
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.vocab_start, ctx.chunk = vocab_start, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        hidden, weight, targets, lse_all = ctx.saved_tensors
        grad_h = torch.empty_like(hidden)
        cdt = _compute_dtype(hidden)
        grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
        for lo in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(lo, lo + ctx.chunk)
            h, g = hidden[sl], grad_out[sl].to(cdt)
            logits = (h @ weight.t()).to(cdt)
            grad_logits = -(logits - lse_all[sl].unsqueeze(-1)).exp() * g.unsqueeze(-1)
            local = targets[sl] - ctx.vocab_start
            in_shard = (local >= 0) & (local < weight.shape[0])
            rows = in_shard.nonzero().squeeze(-1)
            grad_logits[rows, local[rows]] += g[rows]
            grad_h[sl] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_w += grad_logits.t() @ h.to(cdt)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def chunked_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    vocab_start: int,
    chunk_size: int,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> Tensor:
    """``[N]`` log-probs of ``targets`` (global ids) given ``hidden [N, h]`` and a vocab shard."""
    return _ChunkedLogProbs.apply(hidden, weight, targets, vocab_start, chunk_size, tp_group)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    select: Tensor,
    chunk_size: int,
    tp_group: dist.ProcessGroup,
    sequence_parallel: bool = False,
) -> Tensor:
    """``[b, s]`` label log-probs where ``select`` is true, exactly 0 elsewhere.

    ``hidden`` is the last stage's ``[s, b, h]`` output (sequence-sharded under sequence
    parallelism). The output projection runs only on the ``select``-ed positions.
    """
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=tp_group
        )
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    b_idx, s_idx = select.nonzero(as_tuple=True)
    h_sel = hidden[s_idx, b_idx]
    vocab_start = tp_group.rank() * weight.shape[0]
    lp = chunked_logprobs(h_sel, weight, labels[b_idx, s_idx], vocab_start, chunk_size, tp_group)
    out = torch.zeros(select.shape, dtype=lp.dtype, device=lp.device)
    return out.index_put((b_idx, s_idx), lp)
