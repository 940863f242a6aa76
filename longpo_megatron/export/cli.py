"""Command lines: ``longpo-convert-hf-to-megatron`` and ``longpo-convert-megatron-to-hf``.

Both write only into a NEW or EMPTY output directory that is not a symlink and does not overlap
their input (:func:`.output_dir.check_output_dir`), checked before any work. A user
error is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from longpo_megatron.config import ModelConfig
from longpo_megatron.errors import report_user_errors
from longpo_megatron.export.arch import ConversionError, model_config_from_dict
from longpo_megatron.process import silence_fallback_warnings

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS["GIB"] = 2**30


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``1000`` -> bytes (decimal units as in transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def load_model_yaml(path: str) -> ModelConfig:
    """A ``conf/model/*.yaml`` file (its ``defaults`` list ignored) as a :class:`ModelConfig`."""
    import dataclasses

    from omegaconf import OmegaConf

    if not Path(path).is_file():
        raise ConversionError(f"model config {path!r} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a mapping of model keys")
    raw.pop("defaults", None)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConversionError(f"{path}: unknown model key(s) {unknown}")
    return model_config_from_dict(raw)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors (one ``error:`` line, exit 2)."""

    def error(self, message: str):  # noqa: D102
        raise ConversionError(f"{self.prog}: {message} (see {self.prog} --help)")


@report_user_errors
def hf_to_megatron_main(argv: Optional[Sequence[str]] = None) -> int:
    """HF directory -> megatron ``kind="weights"`` checkpoint root (0; a user error exits 2)."""
    silence_fallback_warnings()
    from longpo_megatron.export.convert import convert_hf_to_megatron

    p = _Parser(
        prog="longpo-convert-hf-to-megatron",
        description="Convert an HF Llama / Mistral / Qwen2 model into a megatron weights "
        "checkpoint (loadable at any TP/PP layout).",
    )
    p.add_argument("hf_dir", help="HF model directory (config.json + safetensors)")
    p.add_argument("out_dir", help="megatron checkpoint root to create")
    p.add_argument(
        "--rotary-base",
        type=float,
        default=None,
        help="policy RoPE θ recorded in model.yaml (default: HF rope_theta)",
    )
    p.add_argument(
        "--pad-vocab-multiple",
        type=int,
        default=1,
        help="zero-pad vocabulary rows to a multiple of this (e.g. TP); default 1",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="stored dtype (auto: the HF weights' dtype)",
    )
    p.add_argument(
        "--allow-unmodelled",
        action="store_true",
        help="convert despite a sliding window (outputs will differ); RoPE variants other than "
        "plain, llama3 and yarn are always refused",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    convert_hf_to_megatron(
        a.hf_dir,
        a.out_dir,
        rotary_base=a.rotary_base,
        pad_vocab_multiple=a.pad_vocab_multiple,
        dtype=a.dtype,
        allow_unmodelled=a.allow_unmodelled,
        progress=not a.no_progress,
    )
    return 0


@report_user_errors
def megatron_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    """Megatron checkpoint (root, ``latest`` or iter dir) -> HF directory (0; errors exit 2)."""
    silence_fallback_warnings()
    from longpo_megatron.export.convert import convert_megatron_to_hf

    p = _Parser(
        prog="longpo-convert-megatron-to-hf",
        description="Export a megatron checkpoint (any TP/PP layout) as an HF directory with "
        "sharded safetensors, index, config.json and tokenizer files.",
    )
    p.add_argument("checkpoint", help="checkpoint root, its 'latest' file, or an iter_* dir")
    p.add_argument("out_dir", help="HF directory to create (must be empty or absent)")
    p.add_argument(
        "--model-config",
        default=None,
        help="conf/model YAML (default: the config stored in the checkpoint)",
    )
    p.add_argument(
        "--template",
        default=None,
        help="HF dir supplying tokenizer files and non-architecture config fields "
        "(default: <root>/hf written by the HF->megatron converter)",
    )
    p.add_argument(
        "--hf-vocab-size",
        type=int,
        default=None,
        help="strip padded vocabulary rows down to this size",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="saved dtype (auto: the checkpoint's dtype)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors shard (default 5GB)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    mcfg = load_model_yaml(a.model_config) if a.model_config else None
    convert_megatron_to_hf(
        a.checkpoint,
        a.out_dir,
        model_config=mcfg,
        template_dir=a.template,
        hf_vocab_size=a.hf_vocab_size,
        dtype=a.dtype,
        max_shard_bytes=a.max_shard_size,
        progress=not a.no_progress,
    )
    return 0
