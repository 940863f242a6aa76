"""Architectures: HF ``config.json`` ⇄ :class:`ModelConfig`, and the shapes the mapping needs.

Supported: ``LlamaForCausalLM`` (llama), ``MistralForCausalLM`` (mistral), ``Qwen2ForCausalLM``
(qwen2) -- RMSNorm, SwiGLU, GQA; RoPE plain, ``llama3`` or ``yarn`` (read from either HF config
layout, :mod:`longpo_megatron.export.hf_rope`); QKV bias only for Qwen2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from longpo_megatron.config import ModelConfig
from longpo_megatron.export.hf_rope import ConversionError, hf_number, rope_from_hf, rope_to_hf

__all__ = ["ARCHITECTURES", "ArchSpec", "ConversionError", "family_of", "model_config_from_hf"]

# family -> (HF architecture class name, HF model_type)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
_FAMILY_OF_ARCH = {arch: fam for fam, (arch, _) in ARCHITECTURES.items()}
_FAMILY_OF_TYPE = {mtype: fam for fam, (_, mtype) in ARCHITECTURES.items()}


@dataclass(frozen=True)
class ArchSpec:
    """Everything the tensor mapping needs to know about one model."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """Rows of megatron's embedding / output layer (may be padded past ``hf_vocab_size``)."""
    hf_vocab_size: int
    """Rows of the HF embedding / lm_head."""
    add_qkv_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_model_config(cls, m: ModelConfig, hf_vocab_size: Optional[int] = None) -> ArchSpec:
        """The spec of a :class:`ModelConfig` (``hf_vocab_size`` defaults to its vocab)."""
        hf_vocab = int(hf_vocab_size or m.vocab_size)
        if hf_vocab > m.vocab_size:
            raise ConversionError(
                f"HF vocabulary ({hf_vocab}) is larger than model.vocab_size ({m.vocab_size})"
            )
        if m.num_attention_heads % m.num_query_groups:
            raise ConversionError(
                f"num_attention_heads={m.num_attention_heads} is not a multiple of "
                f"num_query_groups={m.num_query_groups}"
            )
        return cls(
            family=m.family,
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups,
            head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
            vocab_size=m.vocab_size,
            hf_vocab_size=hf_vocab,
            add_qkv_bias=m.add_qkv_bias,
            tie_word_embeddings=m.tie_word_embeddings,
        )


def family_of(hf_config: dict[str, Any], source: str = "config.json") -> str:
    """The project family of an HF config; unsupported architectures raise naming themselves."""
    archs = hf_config.get("architectures") or []
    mtype = hf_config.get("model_type")
    for arch in archs:
        if arch in _FAMILY_OF_ARCH:
            return _FAMILY_OF_ARCH[arch]
    if not archs and mtype in _FAMILY_OF_TYPE:
        return _FAMILY_OF_TYPE[mtype]
    supported = ", ".join(a for a, _ in ARCHITECTURES.values())
    raise ConversionError(
        f"{source}: unsupported architecture {archs or mtype!r} (model_type={mtype!r}); "
        f"supported: {supported}"
    )


def _unmodelled(cfg: dict[str, Any], family: str) -> list[str]:
    """Features of ``cfg`` this project's model does not implement (conversion would be inexact)."""
    out = []
    if cfg.get("hidden_act", "silu") != "silu":
        out.append(f"hidden_act={cfg['hidden_act']!r} (only silu/SwiGLU)")
    if family == "mistral" and cfg.get("sliding_window") is not None:
        out.append(f"sliding_window={cfg['sliding_window']} (full causal attention only)")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        out.append("use_sliding_window=true (full causal attention only)")
    return out


def _unsupported(cfg: dict[str, Any], family: str) -> list[str]:
    """Features that change the parameter set (never convertible)."""
    out = []
    if family == "llama" and cfg.get("attention_bias"):
        out.append("attention_bias=true (Llama biases o_proj too; megatron has QKV bias only)")
    if cfg.get("mlp_bias"):
        out.append("mlp_bias=true")
    return out


def model_config_from_hf(
    hf_config: dict[str, Any],
    *,
    name: Optional[str] = None,
    rotary_base: Optional[float] = None,
    pad_vocab_multiple: int = 1,
    allow_unmodelled: bool = False,
    source: str = "config.json",
) -> ModelConfig:
    """A :class:`ModelConfig` for an HF Llama / Mistral / Qwen2 ``config.json`` dict.

    ``reference_rotary_base`` is the HF θ (top-level ``rope_theta`` or, transformers >= 5,
    ``rope_parameters.rope_theta``); llama3 / yarn scaling is carried over; the policy
    ``rotary_base`` defaults to it and may be raised (LongPO: 1e7). ``pad_vocab_multiple``
    rounds megatron's vocabulary up (e.g. to a multiple of TP); the extra rows are zero-filled.
    """
    family = family_of(hf_config, source)
    bad = _unsupported(hf_config, family)
    if bad:
        raise ConversionError(f"{source}: unsupported {family} feature(s): {'; '.join(bad)}")
    inexact = _unmodelled(hf_config, family)
    if inexact and not allow_unmodelled:
        raise ConversionError(
            f"{source}: {family} feature(s) not modelled by this project: {'; '.join(inexact)}. "
            "Pass --allow-unmodelled to convert anyway (outputs will differ from HF)."
        )

    def num(key: str, kind: type = int, default: Any = None) -> Any:
        return hf_number(hf_config, key, kind, source, default)

    heads = num("num_attention_heads")
    hidden = num("hidden_size")
    head_dim = num("head_dim", default=hidden // heads)
    multiple = max(1, int(pad_vocab_multiple))
    vocab = -(-num("vocab_size") // multiple) * multiple
    theta, rope_fields = rope_from_hf(hf_config, source)
    return ModelConfig(
        name=name or str(hf_config.get("_name_or_path") or family),
        family=family,
        num_layers=num("num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=num("intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=num("num_key_value_heads", default=heads),
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=vocab,
        max_position_embeddings=num("max_position_embeddings", default=4096),
        rotary_base=float(rotary_base if rotary_base is not None else theta),
        reference_rotary_base=theta,
        norm_epsilon=num("rms_norm_eps", float, default=1e-6),
        add_qkv_bias=family == "qwen2",
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        **rope_fields,
    )


def hf_config_from_model(
    m: ModelConfig,
    *,
    hf_vocab_size: Optional[int] = None,
    torch_dtype: str = "bfloat16",
    template: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``m`` (θ = the POLICY θ, ``m.rotary_base``; RoPE keys in
    both transformers layouts, :func:`~longpo_megatron.export.hf_rope.rope_to_hf`).

    ``template`` (e.g. the original model's config.json) supplies everything this project does not
    model (token ids, chat defaults); architecture fields always come from ``m``.
    """
    if m.family not in ARCHITECTURES:
        raise ConversionError(f"model.family={m.family!r} is not one of {sorted(ARCHITECTURES)}")
    if m.add_qkv_bias != (m.family == "qwen2"):
        raise ConversionError(
            f"model.add_qkv_bias={m.add_qkv_bias} does not match family {m.family!r} "
            "(HF Qwen2 always has QKV bias, Llama/Mistral never)"
        )
    arch, mtype = ARCHITECTURES[m.family]
    out: dict[str, Any] = dict(template or {})
    if template and family_of(template, "template config.json") != m.family:
        out = {k: v for k, v in out.items() if k in ("bos_token_id", "eos_token_id")}
    for stale in ("_name_or_path", "transformers_version", "layer_types"):
        out.pop(stale, None)
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    out.update(
        architectures=[arch],
        model_type=mtype,
        vocab_size=int(hf_vocab_size or m.vocab_size),
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.norm_epsilon,
        **rope_to_hf(m),
        tie_word_embeddings=m.tie_word_embeddings,
        torch_dtype=torch_dtype,
    )
    out.pop("dtype", None)
    if m.family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif m.family == "mistral":
        out["sliding_window"] = None
    else:
        out.update(use_sliding_window=False, max_window_layers=m.num_layers)
    return out


def model_config_to_dict(m: ModelConfig) -> dict[str, Any]:
    """Plain-dict form (stored in checkpoint metadata)."""
    return dataclasses.asdict(m)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`model_config_to_dict`; unknown keys are ignored (newer schema)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})
