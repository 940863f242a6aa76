"""RoPE settings of an HF ``config.json`` in both layouts transformers writes, and back.

* transformers < 5: top-level ``rope_theta`` plus ``rope_scaling: {rope_type | type, factor, …}``
  (or null).
* transformers >= 5: ``rope_parameters: {rope_type, rope_theta, factor, …}`` and no top-level
  ``rope_theta``.

Modelled variants: ``default`` (plain RoPE), ``llama3`` (Llama-3.1) and ``yarn`` (Qwen2.5 long
context). Every other variant (linear, dynamic, longrope, per-layer-type parameters, …) is named
and refused: converting it as plain RoPE would silently change every attention score.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from longpo_megatron.config import ModelConfig
from longpo_megatron.errors import UserError

MODELLED = ("default", "llama3", "yarn")
"""HF ``rope_type`` values this project's model implements."""

DEFAULT_THETA = 10000.0
"""transformers' θ for Llama / Mistral / Qwen2 configs that name none (both layouts)."""


class ConversionError(UserError, ValueError):
    """Input that cannot be converted (unsupported architecture, bad shapes, missing files)."""


def hf_number(cfg: dict[str, Any], key: str, kind: type, source: str, default: Any = None) -> Any:
    """``cfg[key]`` as ``kind`` (int | float); a wrong type names the file and key."""
    if key not in cfg or cfg[key] is None:
        if default is None:
            raise ConversionError(f"{source}: missing key {key!r}")
        return default
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not math.isfinite(float(value)):
        what = "an integer" if kind is int else "a number"
        raise ConversionError(f"{source}: {key}={value!r} is not {what}")
    return kind(value)


def _rope_dict(cfg: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    """The RoPE parameter dict of either layout (θ included) and the key it came from."""
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConversionError(f"{source}: rope_parameters={params!r} is not a mapping")
        nested = sorted(k for k, v in params.items() if isinstance(v, dict))
        if nested:
            raise ConversionError(
                f"{source}: rope_parameters has per-layer-type entries {nested}: "
                "not modelled (one RoPE for every layer only)"
            )
        top = cfg.get("rope_theta")
        if top is not None and "rope_theta" in params and float(top) != float(params["rope_theta"]):
            raise ConversionError(
                f"{source}: rope_theta={top!r} disagrees with "
                f"rope_parameters.rope_theta={params['rope_theta']!r}"
            )
        out = dict(params)
        out.setdefault("rope_theta", top if top is not None else DEFAULT_THETA)
        return out, "rope_parameters"
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConversionError(f"{source}: rope_scaling={scaling!r} is not a mapping or null")
    out = dict(scaling or {})
    out["rope_theta"] = cfg.get("rope_theta", DEFAULT_THETA)
    return out, "rope_scaling"


def rope_type_of(params: dict[str, Any]) -> str:
    """HF's ``rope_type`` (legacy ``type``; none means plain RoPE)."""
    return str(params.get("rope_type") or params.get("type") or "default")


def rope_from_hf(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any]]:
    """(θ, the :class:`ModelConfig` rope fields) of an HF config; unmodelled variants raise."""
    params, where = _rope_dict(cfg, source)
    theta = hf_number(params, "rope_theta", float, f"{source}: {where}")
    kind = rope_type_of(params)
    if kind not in MODELLED:
        raise ConversionError(
            f"{source}: {where}.rope_type={kind!r} is not modelled by this project "
            f"(modelled: {', '.join(MODELLED)}); converting it as plain RoPE would change "
            "every attention score"
        )
    if kind == "default":
        return theta, {"rope_scaling": "none"}
    at = f"{source}: {where}"
    factor = hf_number(params, "factor", float, at)
    original = hf_number(
        params,
        "original_max_position_embeddings",
        int,
        at,
        default=cfg.get("max_position_embeddings") if kind == "yarn" else None,
    )
    fields: dict[str, Any] = dict(
        rope_scaling=kind,
        rope_scaling_factor=factor,
        rope_original_max_position_embeddings=original,
    )
    if kind == "llama3":
        fields["rope_low_freq_factor"] = hf_number(params, "low_freq_factor", float, at)
        fields["rope_high_freq_factor"] = hf_number(params, "high_freq_factor", float, at)
    else:
        fields.update(_yarn_fields(params, factor, at))
    return theta, fields


def _yarn_fields(params: dict[str, Any], factor: float, at: str) -> dict[str, Any]:
    """YaRN's β and attention-factor settings, refusing the variants megatron's YaRN lacks."""
    if params.get("truncate") is False:
        raise ConversionError(f"{at}.truncate=false is not modelled (integer correction range)")
    mscale = params.get("mscale")
    all_dim = params.get("mscale_all_dim")
    if not (mscale and all_dim):  # HF: both set -> ratio, else 0.1 ln(factor) + 1
        mscale, all_dim = 1.0, 0.0
    fields = dict(
        yarn_beta_fast=hf_number(params, "beta_fast", float, at, default=32.0),
        yarn_beta_slow=hf_number(params, "beta_slow", float, at, default=1.0),
        yarn_mscale=float(mscale),
        yarn_mscale_all_dim=float(all_dim),
    )
    explicit = params.get("attention_factor")
    if explicit is not None:
        derived = yarn_attention_factor(
            factor, fields["yarn_mscale"], fields["yarn_mscale_all_dim"]
        )
        if not math.isclose(float(explicit), derived, rel_tol=1e-6):
            raise ConversionError(
                f"{at}.attention_factor={explicit!r} is not modelled (only the derived "
                f"{derived:.6g} from factor/mscale)"
            )
    return fields


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """YaRN's cos/sin factor, as transformers and megatron-core both derive it."""

    def get(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    return get(mscale) / get(mscale_all_dim) if mscale_all_dim else get(mscale)


def rope_to_hf(m: ModelConfig, theta: Optional[float] = None) -> dict[str, Any]:
    """The RoPE keys of an HF config for ``m`` in BOTH layouts (``rope_theta`` + ``rope_scaling``
    for transformers < 5, ``rope_parameters`` for >= 5), at θ ``theta`` (default the policy θ)."""
    theta = float(m.rotary_base if theta is None else theta)
    params: dict[str, Any] = {"rope_type": "default"}
    if m.rope_scaling != "none":
        params = {
            "rope_type": m.rope_scaling,
            "factor": m.rope_scaling_factor,
            "original_max_position_embeddings": m.rope_original_max_position_embeddings,
        }
    if m.rope_scaling == "llama3":
        params.update(
            low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor
        )
    elif m.rope_scaling == "yarn":
        params.update(beta_fast=m.yarn_beta_fast, beta_slow=m.yarn_beta_slow)
        if m.yarn_mscale_all_dim:
            params.update(mscale=m.yarn_mscale, mscale_all_dim=m.yarn_mscale_all_dim)
    scaling = None if m.rope_scaling == "none" else dict(params)
    return {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": {**params, "rope_theta": theta},
    }
