"""HF ⇄ megatron checkpoint conversion (single process, streaming, one model copy in memory)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from longpo_megatron.config import ModelConfig
from longpo_megatron.export import megatron_io as mio
from longpo_megatron.export.arch import (
    ArchSpec,
    ConversionError,
    hf_config_from_model,
    model_config_from_dict,
    model_config_from_hf,
    model_config_to_dict,
)
from longpo_megatron.export.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    HFWeights,
    PlannedTensor,
    copy_tokenizer_files,
    read_json,
    require_dir,
    write_sharded_safetensors,
)
from longpo_megatron.export.mapping import (
    TensorMap,
    check_hf_keys,
    check_shape,
    hf_shapes,
    tensor_maps,
    to_hf,
    to_megatron,
)
from longpo_megatron.export.output_dir import check_output_dir

HF_ASSETS = "hf"
"""Subdirectory of a converted megatron root holding the source config.json + tokenizer files."""
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: str) -> Optional[torch.dtype]:
    """``auto`` -> None; ``fp32`` / ``bf16`` / ``fp16`` -> the torch dtype."""
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise ConversionError(f"dtype {name!r}: use auto, fp32, bf16 or fp16")
    return _DTYPES[name]


def _check_mapping_covers(spec: ArchSpec, params: dict[str, torch.Tensor], where: str) -> None:
    mapped = {tm.megatron for tm in tensor_maps(spec)}
    if mapped != set(params):
        raise ConversionError(
            f"{where}: mapping and model disagree: unmapped {sorted(set(params) - mapped)}, "
            f"not in model {sorted(mapped - set(params))}"
        )


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    rotary_base: Optional[float] = None,
    pad_vocab_multiple: int = 1,
    dtype: str = "auto",
    allow_unmodelled: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an HF Llama / Mistral / Qwen2 directory into a megatron ``kind="weights"`` root.

    ``rotary_base`` sets the policy θ (the reference keeps HF's ``rope_theta``);
    ``pad_vocab_multiple`` zero-pads the vocabulary rows to a multiple (e.g. of TP). Writes
    ``<out>/latest``, ``<out>/iter_0000000/``, ``<out>/hf/`` (config.json + tokenizer files) and
    ``<out>/model.yaml`` (a Hydra ``model`` group file). Returns the iteration directory.
    """
    src = require_dir(hf_dir, "HF model directory")
    check_output_dir(out_dir, src)
    hf_cfg = read_json(src / "config.json")
    m = model_config_from_hf(
        hf_cfg,
        name=src.name,
        rotary_base=rotary_base,
        pad_vocab_multiple=pad_vocab_multiple,
        allow_unmodelled=allow_unmodelled,
        source=str(src / "config.json"),
    )
    hf_vocab = int(hf_cfg["vocab_size"])
    spec = ArchSpec.from_model_config(m, hf_vocab)
    weights = HFWeights(src)
    check_hf_keys(weights.keys(), spec, str(src))
    want_dtype = parse_dtype(dtype) or weights.dtype()
    out = Path(out_dir)
    with mio.single_rank_groups() as groups:
        model = mio.build_tp1_model(m, want_dtype, groups)
        _fill_model(mio.model_tensors(model), weights, spec, progress)
        meta = {
            "model_config": model_config_to_dict(m),
            "hf": {"config": hf_cfg, "vocab_size": hf_vocab, "source": str(src.resolve())},
        }
        iter_dir = mio.save_weights_checkpoint(model, out, meta, groups)
    copy_tokenizer_files(src, out / HF_ASSETS)
    (out / HF_ASSETS / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    write_model_yaml(m, out / "model.yaml")
    return iter_dir


@torch.no_grad()
def _fill_model(
    params: dict[str, torch.Tensor], weights: HFWeights, spec: ArchSpec, progress: bool
) -> None:
    """Copy every HF tensor (one megatron tensor's worth at a time) into the model."""
    from tqdm import tqdm

    _check_mapping_covers(spec, params, str(weights.dir))
    shapes = hf_shapes(spec)
    for tm in tqdm(tensor_maps(spec), desc="hf->megatron", unit="tensor", disable=not progress):
        parts = []
        for name in tm.hf:
            t = weights.get(name)
            check_shape(name, t, shapes[name], str(weights.file_of(name)))
            parts.append(t)
        value = to_megatron(tm, parts, spec)
        check_shape(tm.megatron, value, tuple(params[tm.megatron].shape), "model")
        params[tm.megatron].copy_(value)
        del parts, value


def write_model_yaml(m: ModelConfig, path: Path) -> None:
    """A drop-in ``conf/model/<name>.yaml`` for the converted model."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.create(model_config_to_dict(m)))
    head = (
        f"# Converted from HF ({m.family}); reference_rotary_base is the HF rope_theta.\n"
        "defaults:\n  - model_schema\n  - _self_\n\n"
    )
    path.write_text(head + body)


def _export_model_config(
    common: dict[str, Any], template_cfg: Optional[dict], explicit: Optional[ModelConfig]
) -> ModelConfig:
    """Explicit > checkpoint metadata (``model_config`` or run ``config.model``) > template."""
    if explicit is not None:
        return explicit
    if isinstance(common.get("model_config"), dict):
        return model_config_from_dict(common["model_config"])
    run_cfg = common.get("config")
    if isinstance(run_cfg, dict) and isinstance(run_cfg.get("model"), dict):
        return model_config_from_dict(run_cfg["model"])
    if template_cfg is not None:
        return model_config_from_hf(template_cfg, allow_unmodelled=True)
    raise ConversionError(
        "the checkpoint carries no model config: pass --model-config (a conf/model YAML) "
        "or --template (the original HF directory)"
    )


def _template(root: Path, template_dir: Optional[str | Path], common: dict) -> tuple:
    """(template dir or None, template config.json dict or None).

    Directory: explicit > ``<root>/hf`` (written by the HF->megatron converter) > the run's
    ``data.tokenizer`` when it is a local HF directory. Config: the directory's config.json >
    the HF config stored by the converter.
    """
    tdir = None
    run_tok = ((common.get("config") or {}).get("data") or {}).get("tokenizer")
    if template_dir is not None:
        tdir = require_dir(template_dir, "template directory")
    elif (root / HF_ASSETS).is_dir():
        tdir = root / HF_ASSETS
    elif isinstance(run_tok, str) and Path(run_tok).is_dir():
        tdir = Path(run_tok)
    if tdir is not None and (tdir / "config.json").is_file():
        return tdir, read_json(tdir / "config.json")
    hf_meta = common.get("hf")
    return tdir, (hf_meta.get("config") if isinstance(hf_meta, dict) else None)


def _hf_vocab(common: dict, template_cfg: Optional[dict], m: ModelConfig, explicit: Any) -> int:
    if explicit:
        return int(explicit)
    hf_meta = common.get("hf")
    if isinstance(hf_meta, dict) and hf_meta.get("vocab_size"):
        return int(hf_meta["vocab_size"])
    if template_cfg and int(template_cfg.get("vocab_size", 0)) <= m.vocab_size:
        return int(template_cfg.get("vocab_size") or m.vocab_size)
    return m.vocab_size


def _export_plan(
    spec: ArchSpec, params: dict[str, torch.Tensor], dtype: torch.dtype
) -> list[PlannedTensor]:
    """One lazily produced tensor per HF name, in HF order."""
    shapes = hf_shapes(spec)

    def producer(tm: TensorMap, i: int):
        return lambda: to_hf(tm, params[tm.megatron].detach(), spec)[i].to(dtype)

    return [
        PlannedTensor(name, shapes[name], dtype, producer(tm, i))
        for tm in tensor_maps(spec)
        for i, name in enumerate(tm.hf)
    ]


def convert_megatron_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    model_config: Optional[ModelConfig] = None,
    template_dir: Optional[str | Path] = None,
    hf_vocab_size: Optional[int] = None,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Export a megatron checkpoint (root, its ``latest``, or an iter dir) as an HF directory.

    Writes sharded safetensors + ``model.safetensors.index.json`` + ``config.json`` (policy
    ``rope_theta``) + the template's tokenizer files. ``dtype`` auto keeps the stored dtype.
    Returns the output directory.
    """
    check_output_dir(out_dir, checkpoint, *([template_dir] if template_dir else []))
    ckpt_dir = mio.resolve_checkpoint(checkpoint)
    common = mio.read_common(ckpt_dir)
    tdir, template_cfg = _template(ckpt_dir.parent, template_dir, common)
    m = _export_model_config(common, template_cfg, model_config)
    spec = ArchSpec.from_model_config(m, _hf_vocab(common, template_cfg, m, hf_vocab_size))
    stored_dtype = mio.stored_dtype(ckpt_dir)
    out_dtype = parse_dtype(dtype) or stored_dtype
    out = Path(out_dir)
    with mio.single_rank_groups() as groups:
        model = mio.build_tp1_model(m, stored_dtype, groups)
        mio.load_weights(model, ckpt_dir)
        params = mio.model_tensors(model)
        _check_mapping_covers(spec, params, str(ckpt_dir))
        plan = _export_plan(spec, params, out_dtype)
        write_sharded_safetensors(out, plan, max_shard_bytes, progress)
    hf_cfg = hf_config_from_model(
        m,
        hf_vocab_size=spec.hf_vocab_size,
        torch_dtype=_HF_DTYPE_NAMES[out_dtype],
        template=template_cfg,
    )
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if not copy_tokenizer_files(tdir, out):
        warnings.warn(
            f"{out}: no tokenizer files copied; pass --template <original HF directory>",
            stacklevel=2,
        )
    return out
