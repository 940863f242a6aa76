"""RoPE settings from both HF config layouts, and llama3 / YaRN scaling against transformers.

transformers < 5 writes a top-level ``rope_theta`` (+ ``rope_scaling``); transformers >= 5 writes
``rope_parameters: {rope_type, rope_theta, ...}`` only. Every config below is built BOTH ways (the
v5 layout by rewriting the v4 dict the installed transformers writes), so the test holds for
either transformers. Parity: a tiny HF model with the scaling, converted, must give transformers'
logits at positions well past the scaling's anchor length (where the scaling changes RoPE).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from parity_common import rel_err

transformers = pytest.importorskip("transformers")

from longpo_megatron.export import megatron_io as mio  # noqa: E402
from longpo_megatron.export.arch import (  # noqa: E402
    ConversionError,
    hf_config_from_model,
    model_config_from_hf,
)
from longpo_megatron.export.convert import (  # noqa: E402
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)

V, H, FFN, L, ANCHOR = 96, 64, 96, 2, 16
TOL = 1e-5
SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ANCHOR,
    },
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ANCHOR},
}
"""Llama-3.1's and Qwen2.5's published settings, anchored at a tiny context (Qwen uses the legacy
``type`` key)."""
TOKENS = torch.randint(0, V, (2, 6 * ANCHOR), generator=torch.Generator().manual_seed(3))


def v5_layout(cfg: dict) -> dict:
    """The transformers >= 5 form of a v4 config dict: RoPE only under ``rope_parameters``."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    params = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
    if "type" in params:
        params["rope_type"] = params.pop("type")
    out["rope_parameters"] = {**params, "rope_theta": cfg.get("rope_theta", 10000.0)}
    return out


def hf_config(scaling: str):
    """Tiny HF config: Llama-3.1-shaped for llama3, Qwen2.5-shaped (QKV bias) for yarn."""
    common = dict(
        vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8 * ANCHOR,
        rms_norm_eps=1e-6, rope_scaling=dict(SCALINGS[scaling]),
    )  # fmt: skip
    if scaling == "llama3":
        return transformers.LlamaConfig(rope_theta=500000.0, **common)
    return transformers.Qwen2Config(rope_theta=1e6, tie_word_embeddings=False, **common)


def make_hf_model(scaling: str):
    cfg = hf_config(scaling)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.15 * torch.randn_like(p))
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def megatron_logits(root: Path) -> torch.Tensor:
    from longpo_megatron.export.arch import model_config_from_dict

    ckpt = mio.resolve_checkpoint(root)
    m = model_config_from_dict(mio.read_common(ckpt)["model_config"])
    with mio.single_rank_groups() as groups:
        model = mio.build_tp1_model(m, torch.float32, groups)
        mio.load_weights(model, ckpt)
        pos = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
        with torch.no_grad():
            hidden = model(TOKENS, pos, None)
            return (hidden @ model.output_weight().T).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# θ and scaling from both layouts
# --------------------------------------------------------------------------------------------
PLAIN = dict(
    architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=V, hidden_size=H,
    intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128,
)  # fmt: skip


@pytest.mark.parametrize(
    "rope, theta",
    [
        ({"rope_theta": 1e6}, 1e6),  # transformers < 5
        ({"rope_theta": 1e6, "rope_scaling": None}, 1e6),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6),  # >= 5
        ({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e6}}, 1e6),  # both, agreeing
        ({}, 10000.0),  # neither: transformers' own default for these families
    ],
    ids=["v4", "v4-null-scaling", "v5", "both", "none"],
)
def test_theta_of_every_layout(rope, theta):
    m = model_config_from_hf({**PLAIN, **rope})
    assert m.reference_rotary_base == theta and m.rotary_base == theta
    assert m.rope_scaling == "none"
    raised = model_config_from_hf({**PLAIN, **rope}, rotary_base=1e7)
    assert raised.rotary_base == 1e7 and raised.reference_rotary_base == theta


@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_scaling_reads_the_same_from_both_layouts(scaling):
    v4 = hf_config(scaling).to_dict()
    a, b = model_config_from_hf(v4), model_config_from_hf(v5_layout(v4))
    assert a == b and a.rope_scaling == scaling
    assert a.rope_scaling_factor == SCALINGS[scaling]["factor"]
    assert a.rope_original_max_position_embeddings == ANCHOR
    assert a.reference_rotary_base == v4["rope_theta"]


@pytest.mark.parametrize(
    "params, named",
    [
        ({"rope_type": "linear", "factor": 2.0}, "'linear'"),
        ({"type": "dynamic", "factor": 2.0}, "'dynamic'"),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "'longrope'"),
        ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 2.0}, "attention_factor"),
        ({"rope_type": "yarn", "factor": 4.0, "truncate": False}, "truncate"),
    ],
)
@pytest.mark.parametrize("layout", ("v4", "v5"))
def test_unmodelled_rope_variants_are_refused_by_name(params, named, layout):
    cfg = {**PLAIN, "rope_theta": 1e6, "rope_scaling": params}
    cfg = cfg if layout == "v4" else v5_layout(cfg)
    with pytest.raises(ConversionError, match=named):
        model_config_from_hf(cfg, allow_unmodelled=True)


def test_per_layer_rope_and_disagreeing_theta_are_refused():
    nested = {**PLAIN, "rope_parameters": {"full_attention": {"rope_theta": 1e6}}}
    with pytest.raises(ConversionError, match="per-layer-type"):
        model_config_from_hf(nested)
    both = {**PLAIN, "rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e6}}
    with pytest.raises(ConversionError, match="rope_theta=10000.0 disagrees"):
        model_config_from_hf(both)


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("hidden_size", "64", "hidden_size='64' is not an integer"),
        ("num_hidden_layers", 2.5, "num_hidden_layers=2.5 is not an integer"),
        ("num_key_value_heads", True, "num_key_value_heads=True is not an integer"),
        ("rms_norm_eps", "tiny", "rms_norm_eps='tiny' is not a number"),
        ("rope_theta", "1e6", "rope_theta='1e6' is not a number"),
    ],
)
def test_wrong_typed_field_names_file_and_key(tmp_path, key, value, rule):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**PLAIN, "rope_theta": 1e6, key: value}))
    with pytest.raises(ConversionError) as err:
        convert_hf_to_megatron(src, tmp_path / "out", progress=False)
    assert str(src / "config.json") in str(err.value) and rule in str(err.value)


def test_export_writes_both_layouts_and_transformers_reads_them():
    m = model_config_from_hf(hf_config("llama3").to_dict(), rotary_base=1e7)
    out = hf_config_from_model(m)
    assert out["rope_theta"] == 1e7 and out["rope_parameters"]["rope_theta"] == 1e7
    assert out["rope_scaling"]["rope_type"] == "llama3"
    exported = dataclasses.replace(m, reference_rotary_base=1e7)  # the export's θ is the policy's
    assert model_config_from_hf(out) == model_config_from_hf(v5_layout(out)) == exported
    kw = {k: v for k, v in out.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(out["model_type"], **kw)
    assert cfg.rope_theta == 1e7 and cfg.rope_scaling["factor"] == 8.0


# --------------------------------------------------------------------------------------------
# Logits parity with transformers (converted in both layouts; exported back)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_scaled_rope_logits_match_transformers(scaling, tmp_path):
    model = make_hf_model(scaling)
    want = hf_logits(model)
    plain = make_hf_model(scaling)
    plain.config.rope_scaling = None
    plain.model.rotary_emb = type(plain.model.rotary_emb)(config=plain.config)
    assert rel_err(hf_logits(plain), want) > 100 * TOL  # the scaling matters at these positions
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    for layout in ("v4", "v5"):
        cfg = json.loads((hf_dir / "config.json").read_text())
        cfg = cfg if layout == "v4" else v5_layout(cfg)
        (hf_dir / "config.json").write_text(json.dumps(cfg))
        root = tmp_path / f"mg_{layout}"
        convert_hf_to_megatron(hf_dir, root, progress=False)
        err = rel_err(megatron_logits(root), want)
        assert err <= TOL, f"{scaling} ({layout} config): relative logits error {err:.2e}"
    back = convert_megatron_to_hf(tmp_path / "mg_v4", tmp_path / "export", progress=False)
    again = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager")
    assert rel_err(hf_logits(again.float().eval()), want) <= TOL
