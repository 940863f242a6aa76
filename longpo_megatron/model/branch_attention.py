"""Packed shared-prefix rows on CPU without CP, and without any mask tensor.

A packed row is ``[shared prompt | branch 1 | branch 2 | …]`` (padding joins the last branch);
the prompt attends causally to itself and each branch to the whole prompt and causally to
itself (``AttentionMask`` with ``order`` = position ids restarting at the prompt's end per
branch). Per row this is, with the flash kernel that returns the log-sum-exp:
- ONE call for every query of the row against the prompt keys with the kernel's top-left causal
  mask: a prompt query ``i`` sees keys ``≤ i`` (causal), a branch query (index ≥ the prompt's
  length) sees the whole prompt (no mask) — the prompt and every branch's prompt part at once;
- per branch, its queries against its own keys, causal square; the two partial softmaxes are
  merged by their log-sum-exps.
The backward of each part runs the flash backward with the MERGED output and log-sum-exp, which
gives that part's exact share of the gradient (the identity ring attention uses). Saved per layer:
q, k, v, the output (the very tensor ``linear_proj`` saves) and one log-sum-exp per query — no
``[branch × S]`` mask and no expanded K/V copy (GQA heads are stride-0 views of the kv heads).
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


def _merge(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial softmax attentions over disjoint key sets → the attention over their union."""
    merged = torch.logaddexp(lse, lse_b)
    full = (
        out.float() * (lse - merged).exp()[..., None]
        + out_b.float() * (lse_b - merged).exp()[..., None]
    )
    return full.to(out.dtype), merged


def _row(t: Tensor, row: int, groups: int) -> Tensor:
    """Row ``row`` of a ``[s, b, heads, d]`` tensor as ``[groups, heads/groups, s, d]`` (a view)."""
    s, _, heads, d = t.shape
    return t[:, row].permute(1, 0, 2).reshape(groups, heads // groups, s, d)


class _PackedRows(torch.autograd.Function):
    """Every packed row of a micro-batch (``runs[row]``: the end of its shared prompt, 0 if
    none, and the (start, end) of each branch). The merged outputs are written into
    ONE ``[s, b, np·hn]`` buffer, which is what the function returns (the tensor
    ``linear_proj`` saves as its input) and what its backward reads: the attention output is
    held once per layer, not once here and once there."""

    @staticmethod
    def forward(ctx, query, key, value, runs, scale):  # noqa: D102
        s, b, nh, hn = query.shape
        groups = key.shape[2]
        out = query.new_empty(s, b, nh, hn)
        lse = torch.empty(b, groups, nh // groups, s, dtype=torch.float32, device=query.device)
        for row in range(b):
            q, o = _row(query, row, groups), _row(out, row, groups)
            k, v = (t[:, row].permute(1, 0, 2) for t in (key, value))  # [G, s, hn]
            prompt, branches = runs[row]
            g = q.shape[1]
            if prompt:  # the prompt causally, every branch query against the whole prompt
                kp, vp = _heads(k[:, :prompt], g), _heads(v[:, :prompt], g)
                pre, pre_lse = _fwd(q, kp, vp, is_causal=True, scale=scale)
                o[:, :, :prompt] = pre[:, :, :prompt]
                lse[row, :, :, :prompt] = pre_lse[..., :prompt]
            for a, e in branches:
                ko, vo = _heads(k[:, a:e], g), _heads(v[:, a:e], g)
                part, part_lse = _fwd(q[:, :, a:e], ko, vo, is_causal=True, scale=scale)
                if prompt:
                    part, part_lse = _merge(part, part_lse, pre[:, :, a:e], pre_lse[..., a:e])
                o[:, :, a:e] = part
                lse[row, :, :, a:e] = part_lse
        result = out.view(s, b, nh * hn)
        ctx.save_for_backward(query, key, value, result, lse)
        ctx.runs, ctx.scale = runs, scale
        return result

    @staticmethod
    def backward(ctx, dout):  # noqa: D102
        query, key, value, result, lse = ctx.saved_tensors
        s, b, nh, hn = query.shape
        groups, g = key.shape[2], nh // key.shape[2]
        out, dout = result.view(s, b, nh, hn), dout.reshape(s, b, nh, hn)
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for row in range(b):
            q, o, do = (_row(t, row, groups) for t in (query, out, dout))
            dq_row = _row(dq, row, groups)
            k, v, dk_row, dv_row = (t[:, row].permute(1, 0, 2) for t in (key, value, dk, dv))
            prompt, branches = ctx.runs[row]
            # (query span, key span) of each flash call of the forward, all causal (top-left)
            calls = [((0, s), (0, prompt))] if prompt else []
            calls += [((a, e), (a, e)) for a, e in branches]
            for (a, e), (lo, hi) in calls:
                args = (do[:, :, a:e].contiguous(), q[:, :, a:e])
                saved = (o[:, :, a:e].contiguous(), lse[row, :, :, a:e].contiguous())
                kk, vv = _heads(k[:, lo:hi], g), _heads(v[:, lo:hi], g)
                dq_, dk_, dv_ = _bwd(*args, kk, vv, *saved, 0.0, True, scale=ctx.scale)
                dq_row[:, :, a:e] += dq_
                dk_row[:, lo:hi] += dk_.sum(1)
                dv_row[:, lo:hi] += dv_.sum(1)
        return dq, dk, dv, None, None


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


def _all_runs(mask: AttentionMask, rows: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """(end of the shared prompt or 0, the (start, end) of each branch) of every row."""
    runs = []
    for row in range(rows):
        row_runs = branch_runs(mask, row)
        if int(mask.branch[row, 0]) == 0:
            runs.append((row_runs[0][1], row_runs[1:]))
        else:
            runs.append((0, row_runs))
    return runs


def packed_attention(query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, scale: float):
    """Megatron layout in and out: query ``[s, b, np, hn]``, key/value ``[s, b, ng, hn]`` →
    ``[s, b, np·hn]``; rows are packed shared-prefix rows described by ``mask``."""
    # megatron's value is a view into the fused QKV projection output: saving views of it
    # would keep all of q, k, v (pre-RoPE) alive per layer; a compact copy keeps v only
    runs = mask.derived(("branch_runs", query.shape[1]), lambda: _all_runs(mask, query.shape[1]))
    return _PackedRows.apply(query, key, value.contiguous(), runs, scale)
