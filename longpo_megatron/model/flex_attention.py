"""FlexAttention for any :class:`AttentionMask`, as a block-sparse ``BlockMask``.

``FlexCoreAttention`` (``model.attention_backend=flex``, model/attention.py) and the local
attention's packed shared-prefix rows on CUDA run
``torch.nn.attention.flex_attention`` with a ``BlockMask`` built straight from the mask's
per-token ``order``/``branch``/``segment`` ids, never from a dense ``[S × S]`` (or branch × S)
mask: each (query block, key block) pair is classified from per-block min/max of those ids as
empty (skipped: causal future, or a key block wholly inside a branch no query of the block is
in), full (no ``mask_mod`` call) or partial (``mask_mod`` = the :meth:`AttentionMask.allows`
rule, per pair). That is O((S/block)²) integers per layer call.

On CUDA ``flex_attention`` is compiled (Triton kernels that skip empty blocks, O(S) memory). On
CPU it runs eagerly (scores materialised per call: exact, for tests and small runs; torch has
no CPU flex backward, see :func:`_eager`).

Context parallelism: like the local attention, K/V are all-gathered over the CP group
(``gather_sequence``) and the local queries are mapped to their global tokens
(``AttentionMask.query_index``) inside both the block classification and ``mask_mod``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from longpo_megatron.model.attention_mask import AttentionMask

BLOCK = 128
"""FlexAttention tile (queries and keys); the Triton kernels' native block size."""

_compiled = None


def _kernel():
    """``flex_attention`` compiled once per process (the CUDA path)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled


def _block_range(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block (min, max) of ``x`` [b, n] → [b, ceil(n / block)] each (the last block is
    padded with its last value, which changes neither)."""
    b, n = x.shape
    pad = -n % block
    if pad:
        x = torch.cat([x, x[:, -1:].expand(b, pad)], dim=1)
    x = x.view(b, -1, block)
    return x.amin(-1), x.amax(-1)


def _ordered(select: Tensor) -> tuple[Tensor, Tensor]:
    """[b, nq, nk] bool → (count [b, 1, nq], indices [b, 1, nq, nk]) int32, selected first."""
    idx = torch.argsort((~select).to(torch.int8), dim=-1, stable=True)
    return select.sum(-1, dtype=torch.int32)[:, None], idx.to(torch.int32)[:, None]


def _branch_classes(
    q_branch: Tensor, k_branch: Tensor, block: int, empty: Tensor, full: Tensor
) -> None:
    """Branch rule per block pair, in place: a key block wholly inside one branch > 0 is empty
    for a query block without that branch; full needs trunk keys or one shared branch."""
    qb_lo, qb_hi = _block_range(q_branch, block)
    kb_lo, kb_hi = _block_range(k_branch, block)
    b, nq, nk = empty.shape
    qb = torch.cat([q_branch, q_branch[:, -1:].expand(b, -q_branch.shape[1] % block)], dim=1)
    values = torch.arange(int(k_branch.max()) + 1, device=qb.device)
    present = (qb.view(b, nq, block)[..., None] == values).any(2)  # [b, nq, branches]
    sees = present.gather(2, kb_lo.clamp_max(len(values) - 1)[:, None, :].expand(b, nq, nk))
    one_k = (kb_lo == kb_hi)[:, None, :]
    empty |= (kb_lo > 0)[:, None, :] & one_k & ~sees
    same = one_k & (qb_lo == qb_hi)[:, :, None] & (qb_lo[:, :, None] == kb_lo[:, None, :])
    full &= (kb_hi == 0)[:, None, :] | same


def _segment_classes(q_seg: Tensor, k_seg: Tensor, block: int, empty: Tensor, full: Tensor) -> None:
    """Segment rule per block pair, in place: disjoint id ranges are empty; full needs one
    segment on both sides."""
    qs_lo, qs_hi = _block_range(q_seg, block)
    ks_lo, ks_hi = _block_range(k_seg, block)
    empty |= (ks_hi[:, None, :] < qs_lo[:, :, None]) | (ks_lo[:, None, :] > qs_hi[:, :, None])
    one = (ks_lo == ks_hi)[:, None, :] & (qs_lo == qs_hi)[:, :, None]
    full &= one & (ks_lo[:, None, :] == qs_lo[:, :, None])


def block_classes(
    mask: AttentionMask, q_len: int, kv_len: int, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """(empty, full) [b, nq, nk] bool per (query block, key block) of ``q_len`` local queries
    against ``kv_len`` global keys. Empty is exact for causal/branch layouts (conservative
    otherwise: a block it keeps may still be all masked); full means every pair is allowed."""
    q_global = mask.query_global(torch.arange(q_len, device=mask.order.device))
    qo_lo, qo_hi = _block_range(mask.order[:, q_global], block)
    ko_lo, ko_hi = _block_range(mask.order[:, :kv_len], block)
    empty = ko_lo[:, None, :] > qo_hi[:, :, None]
    full = ko_hi[:, None, :] <= qo_lo[:, :, None]
    if mask.branch is not None:
        _branch_classes(mask.branch[:, q_global], mask.branch[:, :kv_len], block, empty, full)
    if mask.segment is not None:
        _segment_classes(mask.segment[:, q_global], mask.segment[:, :kv_len], block, empty, full)
    if q_len % block:  # ragged tail blocks: let mask_mod see them
        full[:, -1, :] = False
    if kv_len % block:
        full[:, :, -1] = False
    return empty, full & ~empty


def flex_block_mask(mask: AttentionMask, q_len: int, kv_len: int, block: int = BLOCK) -> BlockMask:
    """The ``BlockMask`` of ``mask`` for ``q_len`` local queries against ``kv_len`` keys."""
    empty, full = block_classes(mask, q_len, kv_len, block)
    partial = ~empty & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    q_index = mask.query_index

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx if q_index is None else q_index[q_idx]
        return mask.allows(b, q, kv_idx)

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def flex_attend(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float, block: int = BLOCK
) -> Tensor:
    """``softmax(q kᵀ·scale + mask) v`` for q ``[b, h, sq, d]``, k/v ``[b, hk, S, d]`` (GQA)."""
    shape = (q.shape[2], k.shape[2], block)
    block_mask = mask.derived(("flex", *shape), lambda: flex_block_mask(mask, *shape))
    if not q.is_cuda:
        return _eager(q, k, v, block_mask, scale)
    gqa = k.shape[1] != q.shape[1]
    return _kernel()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _eager(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    """CPU: the flex_attention operator's eager (math) implementation and its backward, called
    directly. The public function refuses CPU backward by a device check only; this is the call
    it makes after its checks (same mask_mod, scores materialised): the exact CPU stand-in the
    tests compare, not a fast path."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op
    from torch.nn.attention import flex_attention as api

    options = api._apply_kernel_options(q, k, v, False, None)
    out, _, _ = flex_op(q, k, v, api._identity, block_mask.as_tuple(), scale, options)
    return out
