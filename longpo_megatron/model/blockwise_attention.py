"""Exact attention in blocks with recomputation (FlashAttention-2 algorithm in PyTorch).

Memory is O(block_q × block_k) per step plus the inputs, output and one log-sum-exp per query,
for any mask :class:`AttentionMask` can describe; fully-masked blocks are skipped. Runs on CPU
and CUDA. Used by the project core attention when the mask is not plain causal or when keys come
from other context-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longpo_megatron.model.attention_mask import AttentionMask


def _blocks(n: int, size: int, device) -> list[Tensor]:
    return [torch.arange(lo, min(lo + size, n), device=device) for lo in range(0, n, size)]


def _expand(x: Tensor, groups: int) -> Tensor:
    """[b, hk, s, d] → [b, hk·g, s, d] (query head j uses kv head j // g)."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _scores(q, k, mask: AttentionMask, qi, ki, scale) -> Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return s.masked_fill(~mask.allowed(mask.query_global(qi), ki), float("-inf"))


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, bq, bk):  # noqa: D102
        cdt = torch.promote_types(q.dtype, torch.float32)
        b, h, sq, d = q.shape
        g = h // k.shape[1]
        out = torch.zeros(b, h, sq, d, dtype=cdt, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=cdt, device=q.device)
        kblocks = _blocks(k.shape[2], bk, q.device)
        for qi in _blocks(sq, bq, q.device):
            qb = q[:, :, qi].to(cdt)
            m = torch.full((b, h, len(qi)), float("-inf"), dtype=cdt, device=q.device)
            l_ = torch.zeros_like(m)
            acc = torch.zeros(b, h, len(qi), d, dtype=cdt, device=q.device)
            for ki in kblocks:
                if mask.block_is_empty(mask.query_global(qi), ki):
                    continue
                s = _scores(qb, _expand(k[:, :, ki], g).to(cdt), mask, qi, ki, scale)
                m_new = torch.maximum(m, s.amax(-1))
                safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(s - safe[..., None])
                alpha = torch.exp(m - safe)
                l_ = l_ * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + p @ _expand(v[:, :, ki], g).to(cdt)
                m = m_new
            seen = l_ > 0
            out[:, :, qi] = torch.where(seen[..., None], acc / l_.clamp_min(1e-30)[..., None], 0)
            lse[:, :, qi] = torch.where(seen, m + torch.log(l_.clamp_min(1e-30)), float("-inf"))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.bq, ctx.bk = mask, scale, bq, bk
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale = ctx.mask, ctx.scale
        cdt = torch.promote_types(q.dtype, torch.float32)
        b, h, sq, d = q.shape
        hk, g = k.shape[1], h // k.shape[1]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
        delta = (dout.to(cdt) * out.to(cdt)).sum(-1)
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        for qi in _blocks(sq, ctx.bq, q.device):
            qb, dob = q[:, :, qi].to(cdt), dout[:, :, qi].to(cdt)
            for ki in _blocks(k.shape[2], ctx.bk, q.device):
                if mask.block_is_empty(mask.query_global(qi), ki):
                    continue
                kb, vb = _expand(k[:, :, ki], g).to(cdt), _expand(v[:, :, ki], g).to(cdt)
                p = torch.exp(_scores(qb, kb, mask, qi, ki, scale) - safe_lse[:, :, qi, None])
                dp = dob @ vb.transpose(-1, -2)
                ds = p * (dp - delta[:, :, qi, None]) * scale
                dq[:, :, qi] += ds @ kb
                dk[:, :, ki] += (ds.transpose(-1, -2) @ qb).view(b, hk, g, len(ki), d).sum(2)
                dv[:, :, ki] += (p.transpose(-1, -2) @ dob).view(b, hk, g, len(ki), d).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def blockwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    scale: float,
    block_q: int = 256,
    block_k: int = 512,
) -> Tensor:
    """``softmax(q kᵀ·scale + mask) v`` for q ``[b, h, sq, d]``, k/v ``[b, hk, S, d]`` (GQA)."""
    return _BlockwiseAttention.apply(q, k, v, mask, scale, block_q, block_k)
