"""Project-owned core attention: exact softmax attention that runs on CPU and CUDA.

It plugs into megatron's ``SelfAttentionSubmodules.core_attention`` seam. megatron's own
``DotProductAttention`` needs CUDA buffers and refuses context parallelism; TransformerEngine is
GPU-only. The same code is the CPU path and a real CUDA path in the GPU test tier:

- plain causal, no CP: ``scaled_dot_product_attention(is_causal=True)`` (flash kernels on CPU
  and CUDA, O(S) memory);
- packed shared-prefix rows, no CP: the mask-free prompt/branch decomposition merged by
  log-sum-exp on CPU (:mod:`.branch_attention`), FlexAttention on CUDA (:mod:`.flex_attention`);
- an :class:`AttentionMask` (segments / branches) or context parallelism: keys and values are
  all-gathered over the CP group and :func:`blockwise_attention` runs with recomputation.
:class:`FlexCoreAttention` (``model.attention_backend=flex``) runs every row through
FlexAttention instead.

Why all-gather rather than a ring on this path: with GQA the gathered K/V of a layer is
``2·S·ng·hn`` values — for Mistral/Qwen (ng·hn = 1024/512, h = 4096/3584) that is ≤ 1/4 of a
single ``[S, h]`` activation, transient (freed after the layer; recomputed K/V are re-gathered),
and the blockwise kernel never materialises scores beyond ``block_q × block_k``. Per-rank
activation memory therefore still falls ~1/CP. A ring would save the remaining K/V buffer at the
cost of 2·CP sequential exchanges per layer; on GPUs TransformerEngine's p2p ring does that.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longpo_megatron.context_parallel import gather_sequence
from longpo_megatron.model.attention_mask import AttentionMask
from longpo_megatron.model.blockwise_attention import blockwise_attention
from longpo_megatron.model.branch_attention import packed_attention
from longpo_megatron.model.flex_attention import flex_attend


class LocalCoreAttention(MegatronModule):
    """Causal (or explicitly masked) grouped-query attention over one TP shard of heads.

    Shapes follow megatron's core-attention contract: query ``[sq, b, np, hn]``, key/value
    ``[sk, b, ng, hn]`` (``np``/``ng`` heads and query groups on this TP rank); returns
    ``[sq, b, np * hn]``. ``attention_mask`` uses megatron's convention (True = masked out).
    """

    recompute: bool = False

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        self.cp_group = pg_collection.cp if pg_collection is not None else None
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[object] = None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "LocalCoreAttention: packed sequences and attention_bias are not supported"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(
                self._attend, query, key, value, attention_mask, mask_type, use_reentrant=False
            )
        return self._attend(query, key, value, attention_mask, mask_type)

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        mask_type: AttnMaskType,
    ) -> Tensor:
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if isinstance(attention_mask, AttentionMask):
            if attention_mask.branch is not None and attention_mask.query_index is None:
                return self._attend_packed(query, key, value, attention_mask)
            return self._attend_blockwise(query, key, value, attention_mask)
        if cp > 1:
            raise ValueError(
                "LocalCoreAttention: context parallelism needs an AttentionMask carrying this "
                "rank's token indices (context_parallel.split_batch adds it)"
            )
        return self._attend_sdpa(query, key, value, attention_mask, mask_type)

    def _attend_blockwise(
        self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask
    ) -> Tensor:
        sq, b, nh, hn = query.shape
        if mask.query_index is not None:
            key = gather_sequence(key, mask.query_index, self.cp_group)
            value = gather_sequence(value, mask.query_index, self.cp_group)
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        out = blockwise_attention(q, k, v, mask, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)

    def _attend_packed(
        self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask
    ) -> Tensor:
        """Packed shared-prefix rows without CP, with no mask tensor: on CPU the prompt /
        branch decomposition merged by log-sum-exp (:mod:`.branch_attention`); on CUDA
        FlexAttention with the block-sparse mask (:mod:`.flex_attention`)."""
        if self.training and self.dropout_p > 0:
            raise ValueError("LocalCoreAttention: packed rows need attention_dropout=0")
        if query.is_cuda:
            return self._attend_flex(query, key, value, mask)
        return packed_attention(query, key, value, mask, self.softmax_scale)

    def _attend_flex(
        self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask
    ) -> Tensor:
        """FlexAttention over all-gathered K/V (CP) with ``mask`` as a block-sparse mask."""
        if mask.query_index is not None:
            key = gather_sequence(key, mask.query_index, self.cp_group)
            value = gather_sequence(value, mask.query_index, self.cp_group)
        sq, b, nh, hn = query.shape
        # value.contiguous(): see branch_attention.packed_attention (no fused-QKV buffer kept)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value.contiguous()))
        out = flex_attend(q, k, v, mask, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)

    def _attend_sdpa(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        mask_type: AttnMaskType,
    ) -> Tensor:
        sq, b, nh, hn = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        # The kernel shares each K/V group among its heads (enable_gqa) instead of saving
        # np/ng copies for backward. ``value`` is a view of megatron's fused QKV projection
        # output (``key`` is RoPE's own tensor): saved as a view, it would keep that whole
        # output alive, so it gets its own [b, ng, sk, hn] storage.
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3).contiguous()
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != nh,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)


class RecomputedLocalCoreAttention(LocalCoreAttention):
    """Selective recomputation: the attention's activations are recomputed in backward."""

    recompute = True


class FlexCoreAttention(LocalCoreAttention):
    """``model.attention_backend=flex``: every row (plain causal, segments, packed branches,
    CP-local queries against gathered K/V) through torch FlexAttention with a block-sparse
    mask built from the :class:`AttentionMask` (:func:`.flex_attention.flex_attend`)."""

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        mask_type: AttnMaskType,
    ) -> Tensor:
        if self.training and self.dropout_p > 0:
            raise ValueError("FlexCoreAttention: attention_dropout must be 0")
        if not isinstance(attention_mask, AttentionMask):
            if self.cp_group is not None and self.cp_group.size() > 1:
                raise ValueError(
                    "FlexCoreAttention: context parallelism needs an AttentionMask carrying "
                    "this rank's token indices (context_parallel.split_batch adds it)"
                )
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("FlexCoreAttention: expects an AttentionMask or causal None")
            attention_mask = AttentionMask.causal(query.shape[1], query.shape[0], query.device)
        return self._attend_flex(query, key, value, attention_mask)


class RecomputedFlexCoreAttention(FlexCoreAttention):
    """Selective recomputation: the attention's activations are recomputed in backward."""

    recompute = True
