"""Project-owned core attention: exact softmax attention that runs on CPU and CUDA.

It plugs into megatron's ``SelfAttentionSubmodules.core_attention`` seam. megatron's own
``DotProductAttention`` needs CUDA buffers and refuses context parallelism; TransformerEngine is
GPU-only. This module uses ``torch.nn.functional.scaled_dot_product_attention`` so the same code
is the CPU path and a real CUDA path in the GPU test tier.
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
        if config.context_parallel_size != 1:
            raise ValueError(
                "LocalCoreAttention: context_parallel_size must be 1 (this attention does not "
                "exchange keys/values across CP ranks)"
            )
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
        sq, b, nh, hn = query.shape
        groups = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3).repeat_interleave(nh // groups, dim=1)
        v = value.permute(1, 2, 0, 3).repeat_interleave(nh // groups, dim=1)
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
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)


class RecomputedLocalCoreAttention(LocalCoreAttention):
    """Selective recomputation: the attention's activations are recomputed in backward."""

    recompute = True
