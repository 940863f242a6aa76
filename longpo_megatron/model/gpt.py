"""The policy/reference network: a megatron-core ``GPTModel`` built from the project's specs.

:class:`LongPOGPTModel` returns final-normed hidden states on the last pipeline stage instead of
logits, so the loss layer can apply the output layer only at positions whose labels count, in
chunks (no ``[sequence x vocab]`` tensor is ever made).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from longpo_megatron.config import ModelConfig
from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.model.attention_mask import AttentionMask
from longpo_megatron.model.rope import DeviceAgnosticRotaryEmbedding
from longpo_megatron.model.spec import layer_spec


@dataclass
class ModelLayout:
    """What the model builder needs to know about the resolved run layout."""

    tp: int
    pp: int
    cp: int
    sequence_parallel: bool
    attention_backend: str
    """local | flex | te"""
    engine: str
    """cpu | gpu"""
    precision: str
    """fp32 | bf16"""
    cp_comm_type: str = "p2p"
    """TransformerEngine context-parallel exchange (p2p ring | a2a | all_gather); te only."""


class LongPOGPTModel(GPTModel):
    """``GPTModel`` whose last stage yields hidden states; RoPE that stays on the model's device."""

    def __init__(
        self,
        *args,
        rotary_base: float = 10000.0,
        rope_scaling: Optional[ModelConfig] = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        if self.position_embedding_type == "rope":
            old = self.rotary_pos_emb
            self.rotary_pos_emb = DeviceAgnosticRotaryEmbedding(
                kv_channels=self.config.kv_channels,
                rotary_percent=self.rotary_percent,
                rotary_interleaved=self.config.rotary_interleaved,
                seq_len_interpolation_factor=old.seq_len_interpolation_factor,
                rotary_base=rotary_base,
                scaling=rope_scaling,
                use_cpu_initialization=True,
                cp_group=self.pg_collection.cp,
            )

    takes_mask_spec: bool = True
    """The core attention reads an :class:`AttentionMask` (project attention); TE's takes
    ``None`` for causal and does its own context-parallel exchange."""

    def _postprocess(self, hidden_states: Tensor, **kwargs) -> Tensor:  # noqa: D102
        return hidden_states

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):  # noqa: D102
        # Packed shared-prefix rows (a mask with branches) need RoPE at their position ids:
        # megatron's rotary embedding assumes 0..S-1 (both branches restart after the prompt).
        packed = isinstance(attention_mask, AttentionMask) and attention_mask.branch is not None
        rope = self.rotary_pos_emb if self.position_embedding_type == "rope" else None
        if rope is not None and packed:
            rope.positions = position_ids
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            if rope is not None:
                rope.positions = None

    def output_weight(self) -> Tensor:
        """The (vocab-parallel) output projection ``[vocab/TP, hidden]`` used by the loss layer."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


@dataclass
class LongPOTransformerConfig(TransformerConfig):
    """megatron's ``TransformerConfig`` plus the YaRN attention-factor fields its attention reads
    (``_yarn_get_concentration_factor_from_config``); the defaults leave cos/sin unscaled."""

    yarn_rotary_scaling_factor: float = 1.0
    """YaRN context extension factor (1 = plain RoPE: cos/sin unscaled)."""
    yarn_mscale: float = 1.0
    """Numerator coefficient of YaRN's cos/sin factor."""
    yarn_mscale_all_dim: float = 0.0
    """Denominator coefficient of YaRN's cos/sin factor."""


def _yarn_fields(m: ModelConfig) -> dict:
    if m.rope_scaling != "yarn":
        return {}
    return dict(
        yarn_rotary_scaling_factor=m.rope_scaling_factor,
        yarn_mscale=m.yarn_mscale,
        yarn_mscale_all_dim=m.yarn_mscale_all_dim,
    )


def transformer_config(
    m: ModelConfig, layout: ModelLayout, recompute_layers: Optional[int] = None
) -> TransformerConfig:
    """megatron ``TransformerConfig`` for a Mistral/Llama/Qwen2-family model."""
    bf16 = layout.precision == "bf16"
    on_gpu = layout.engine == "gpu"
    # the local spec recomputes by module variant (spec.py); megatron's own recompute on top of it
    # would run every layer's forward three times per step, so it is configured for TE only
    by_megatron = on_gpu and layout.attention_backend == "te"
    recompute = {}
    if by_megatron and m.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=recompute_layers or 1,
        )
    elif by_megatron and m.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return LongPOTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        cp_comm_type=layout.cp_comm_type
        if layout.cp > 1 and layout.attention_backend == "te"
        else None,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        # the local spec's MLP applies model/activation.py's SwiGLU module (no extra tensor);
        # only a spec that provides that module may set it (else MLP would skip the gating)
        use_te_activation_func=layout.attention_backend in ("local", "flex"),
        masked_softmax_fusion=on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        **recompute,
        **_yarn_fields(m),
    )


def reference_model_config(m: ModelConfig) -> ModelConfig:
    """The frozen reference's architecture: the policy's, at the reference RoPE θ and scaling."""
    return dataclasses.replace(
        m,
        rotary_base=m.reference_rotary_base or m.rotary_base,
        rope_scaling=m.reference_rope_scaling or m.rope_scaling,
        reference_rotary_base=None,
        reference_rope_scaling=None,
    )


def build_model(
    m: ModelConfig,
    layout: ModelLayout,
    groups: ParallelGroups,
    rotary_base: Optional[float] = None,
    init_weights: bool = True,
) -> LongPOGPTModel:
    """Build this rank's pipeline stage of the model (weights initialised from the global seed).

    ``rotary_base`` overrides ``m.rotary_base`` (the reference keeps the original θ).
    ``init_weights=False`` leaves linear/embedding weights uninitialised (callers that overwrite
    every weight right away, e.g. checkpoint conversion, skip the random-init time and memory).
    """
    config = transformer_config(m, layout)
    config.perform_initialization = init_weights
    model = LongPOGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(layout.attention_backend, m.recompute),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=rotary_base if rotary_base is not None else m.rotary_base,
        rope_scaling=m,
        pg_collection=groups.pg_collection,
    )
    model.takes_mask_spec = layout.attention_backend != "te"
    if layout.engine == "gpu":
        model = model.cuda(torch.cuda.current_device())
        model.rotary_pos_emb.to_device(next(model.parameters()).device)
    return model
