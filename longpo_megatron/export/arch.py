"""Architectures: HF ``config.json`` ⇄ :class:`ModelConfig`, and the shapes the mapping needs.

Supported: ``LlamaForCausalLM`` (llama), ``MistralForCausalLM`` (mistral), ``Qwen2ForCausalLM``
(qwen2) -- RMSNorm, SwiGLU, GQA, plain RoPE; QKV bias only for Qwen2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from longpo_megatron.config import ModelConfig
from longpo_megatron.errors import UserError

# family -> (HF architecture class name, HF model_type)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
_FAMILY_OF_ARCH = {arch: fam for fam, (arch, _) in ARCHITECTURES.items()}
_FAMILY_OF_TYPE = {mtype: fam for fam, (_, mtype) in ARCHITECTURES.items()}


class ConversionError(UserError, ValueError):
    """Input that cannot be converted (unsupported architecture, bad shapes, missing files)."""


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
    if cfg.get("rope_scaling"):
        out.append(f"rope_scaling={cfg['rope_scaling']!r} (plain RoPE only)")
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

    ``reference_rotary_base`` is the HF ``rope_theta``; the policy ``rotary_base`` defaults to
    it and may be raised (LongPO: 1e7). ``pad_vocab_multiple`` rounds megatron's vocabulary up
    (e.g. to a multiple of TP); the extra rows are zero-filled by the converter.
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
    required = ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers")
    absent = [k for k in (*required, "intermediate_size") if k not in hf_config]
    if absent:
        raise ConversionError(f"{source}: missing key(s) {absent}")
    heads = int(hf_config["num_attention_heads"])
    hidden = int(hf_config["hidden_size"])
    head_dim = hf_config.get("head_dim") or hidden // heads
    multiple = max(1, int(pad_vocab_multiple))
    vocab = -(-int(hf_config["vocab_size"]) // multiple) * multiple
    theta = float(hf_config.get("rope_theta", 10000.0))
    return ModelConfig(
        name=name or str(hf_config.get("_name_or_path") or family),
        family=family,
        num_layers=int(hf_config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf_config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf_config.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        vocab_size=vocab,
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 4096)),
        rotary_base=float(rotary_base if rotary_base is not None else theta),
        reference_rotary_base=theta,
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=family == "qwen2",
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )


def hf_config_from_model(
    m: ModelConfig,
    *,
    hf_vocab_size: Optional[int] = None,
    torch_dtype: str = "bfloat16",
    template: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``m`` (``rope_theta`` = the POLICY θ, ``m.rotary_base``).

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
    for stale in ("_name_or_path", "transformers_version", "rope_scaling", "layer_types"):
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
        rope_theta=m.rotary_base,
        rope_scaling=None,
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
