"""Packed shared-prefix rows on CPU without CP, and without any mask tensor.

A packed row is ``[shared prompt | branch 1 | branch 2 | …]`` (padding joins the last branch);
the prompt attends causally to itself and each branch to the whole prompt and causally to
itself (``AttentionMask`` with ``order`` = position ids restarting at the prompt's end per
branch). Per row this is, with the flash kernel that returns the log-sum-exp:
- the prompt: causal self-attention;
- each branch: (a) its queries against the prompt keys, no mask, and (b) against its own keys,
  causal square; the two partial softmaxes are merged by their log-sum-exps.
The backward of each part runs the flash backward with the MERGED output and log-sum-exp, which
gives that part's exact share of the gradient (the identity ring attention uses). Saved per layer:
q, k, v, the output and one log-sum-exp per query — no ``[branch × S]`` mask and no expanded
K/V copy (GQA heads are stride-0 views of the kv heads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longpo_megatron.model.attention_mask import AttentionMask

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _heads(kv: Tensor, group: int) -> Tensor:
    """[G, s, d] kv heads → [G, group, s, d] stride-0 view (query head j uses kv head j // g)."""
    return kv.unsqueeze(1).expand(kv.shape[0], group, kv.shape[1], kv.shape[2])


class _PrefixBranchAttention(torch.autograd.Function):
    """Queries q ``[G, g, s, d]`` of one run against the prefix keys (all visible; may be
    empty) and causally against their own keys; k/v ``[G, s_*, d]``."""

    @staticmethod
    def forward(ctx, q, k_pre, v_pre, k_own, v_own, scale):  # noqa: D102
        g = q.shape[1]
        out, lse = _fwd(q, _heads(k_own, g), _heads(v_own, g), is_causal=True, scale=scale)
        if k_pre.shape[1]:
            out_pre, lse_pre = _fwd(q, _heads(k_pre, g), _heads(v_pre, g), scale=scale)
            merged = torch.logaddexp(lse, lse_pre)
            out = (
                out.float() * (lse - merged).exp()[..., None]
                + out_pre.float() * (lse_pre - merged).exp()[..., None]
            )
            out, lse = out.to(q.dtype), merged
        ctx.save_for_backward(q, k_pre, v_pre, k_own, v_own, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        q, k_pre, v_pre, k_own, v_own, out, lse = ctx.saved_tensors
        g, dout = q.shape[1], dout.contiguous()
        dq, dk, dv = _bwd(
            dout, q, _heads(k_own, g), _heads(v_own, g), out, lse, 0.0, True, scale=ctx.scale
        )
        dk_pre = dv_pre = None
        if k_pre.shape[1]:
            dq_pre, dk_pre, dv_pre = _bwd(
                dout, q, _heads(k_pre, g), _heads(v_pre, g), out, lse, 0.0, False, scale=ctx.scale
            )
            dq = dq + dq_pre
            dk_pre, dv_pre = dk_pre.sum(1), dv_pre.sum(1)
        return dq, dk_pre, dv_pre, dk.sum(1), dv.sum(1), None


def branch_runs(mask: AttentionMask, row: int) -> list[tuple[int, int]]:
    """(start, end) of the prompt and of each branch of packed row ``row``; refuses a row whose
    mask is not the layout above (the decomposition would not equal it)."""
    branch, order = mask.branch[row], mask.order[row]
    cuts = (torch.nonzero(branch[1:] != branch[:-1]).flatten() + 1).tolist()
    bounds = [0, *cuts, branch.numel()]
    runs = list(zip(bounds[:-1], bounds[1:]))
    values = [int(branch[a]) for a, _ in runs]
    prompt = runs[0][1] if values[0] == 0 else 0
    if 0 in values[1:] or len(set(values)) != len(values):
        raise ValueError(
            f"packed row {row}: the shared prompt (branch 0) must come first and each branch "
            f"must be one contiguous run; got branch runs {values}"
        )
    for (a, e), v in zip(runs, values):
        start = 0 if v == 0 else prompt
        if not torch.equal(order[a:e], torch.arange(start, start + e - a, device=order.device)):
            raise ValueError(
                f"packed row {row}: positions of branch {v} must run {start}.. from the "
                "shared prompt's end"
            )
    return runs


def packed_attention(query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, scale: float):
    """Megatron layout in and out: query ``[s, b, np, hn]``, key/value ``[s, b, ng, hn]`` →
    ``[s, b, np·hn]``; rows are packed shared-prefix rows described by ``mask``."""
    s, b, nh, hn = query.shape
    groups = key.shape[2]
    # megatron's value is a view into the fused QKV projection output: saving views of it
    # would keep all of q, k, v (pre-RoPE) alive per layer; a compact copy keeps v only
    value = value.contiguous()
    outs = []
    for row in range(b):
        q = query[:, row].permute(1, 0, 2).reshape(groups, nh // groups, s, hn)
        k, v = (t[:, row].permute(1, 0, 2) for t in (key, value))  # [G, s, hn]
        runs = branch_runs(mask, row)
        prompt = runs[0][1] if int(mask.branch[row, 0]) == 0 else 0
        parts = []
        for a, e in runs:
            pre = prompt if a else 0
            parts.append(
                _PrefixBranchAttention.apply(
                    q[:, :, a:e], k[:, :pre], v[:, :pre], k[:, a:e], v[:, a:e], scale
                )
            )
        outs.append(torch.cat(parts, dim=2).reshape(nh, s, hn))
    return torch.stack(outs, dim=1).permute(2, 1, 0, 3).reshape(s, b, nh * hn)
