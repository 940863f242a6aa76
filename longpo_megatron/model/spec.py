"""Layer specs: which module implements each part of a decoder layer, per engine.

Variants are chosen here, in spec functions, not by ``if`` branches inside modules:
- ``local``: megatron's column/row-parallel linears, torch RMSNorm, the project-owned core
  attention (runs on CPU and CUDA) and SwiGLU module (:mod:`.activation`). Recomputation on
  this path is chosen by module variant (:class:`RecomputedTransformerLayer`,
  :class:`RecomputedLocalCoreAttention`), because megatron's own checkpoint function forks the
  CUDA RNG tracker.
- ``flex``: the ``local`` layer with FlexAttention core attention
  (:class:`~longpo_megatron.model.attention.FlexCoreAttention`): every mask as a block-sparse
  ``BlockMask``; the long-context path for packed shared-prefix rows on GPUs.
- ``te``: megatron's TransformerEngine spec (GPU clusters); recomputation is configured on
  ``TransformerConfig`` and run by megatron.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch.utils.checkpoint import checkpoint

from longpo_megatron.model.activation import SwiGLU
from longpo_megatron.model.attention import (
    FlexCoreAttention,
    LocalCoreAttention,
    RecomputedFlexCoreAttention,
    RecomputedLocalCoreAttention,
)


class RecomputedTransformerLayer(TransformerLayer):
    """Full recomputation: only the layer input is kept; the layer reruns in backward."""

    def forward(self, *args, **kwargs):  # noqa: D102 - same contract as TransformerLayer
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


CORE_ATTENTION = {
    "local": (LocalCoreAttention, RecomputedLocalCoreAttention),
    "flex": (FlexCoreAttention, RecomputedFlexCoreAttention),
}
"""Project core attention per backend: (plain, selectively recomputed)."""


def local_layer_spec(recompute: str = "none", attention: str = "local") -> ModuleSpec:
    """Mistral/Llama/Qwen2 decoder layer from megatron-core modules + project attention
    (``attention``: local or flex core attention)."""
    layer = RecomputedTransformerLayer if recompute == "full" else TransformerLayer
    core = CORE_ATTENTION[attention][recompute == "selective"]
    return ModuleSpec(
        module=layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear,
                    activation_func=SwiGLU,  # used under use_te_activation_func (gpt.py)
                    linear_fc2=RowParallelLinear,
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_layer_spec() -> ModuleSpec:
    """megatron's TransformerEngine layer spec (fused norm+linear, TE attention with CP)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec()


def layer_spec(attention_backend: str, recompute: str) -> ModuleSpec:
    """The spec for a resolved attention backend (``local``, ``flex`` or ``te``)."""
    if attention_backend == "te":
        return te_layer_spec()
    if attention_backend in CORE_ATTENTION:
        return local_layer_spec(recompute, attention_backend)
    raise ValueError(f"model.attention_backend={attention_backend!r}: expected local, flex or te")
