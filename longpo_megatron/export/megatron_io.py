"""The megatron side of conversion: a TP=1 / PP=1 model in a 1-rank gloo group, and its checkpoint.

Checkpoint I/O goes through :mod:`longpo_megatron.checkpoint` (docs/checkpoint-format.md).
megatron's ``dist_checkpointing`` reshards, so what is saved here from TP=1/PP=1 loads into any
TP/PP layout, and any saved layout loads here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from longpo_megatron.config import ModelConfig
from longpo_megatron.export.arch import ConversionError

PREFIX = "model."
_DTYPE_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def single_rank_groups() -> Iterator[Any]:
    """megatron's TP=1/PP=1/CP=1 groups in a 1-rank gloo world; torn down on exit if made here.

    An already-initialised ONE-rank world is reused (and left up); inside a multi-rank job
    conversion refuses to run (it is a single-process tool).
    """
    import torch.distributed as dist

    from longpo_megatron import distributed

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("conversion runs in a single process, not in a multi-rank job")
        groups = distributed.init_model_parallel(1, 1, 1)
        if groups.tp_size != 1 or groups.pp_size != 1:
            raise ConversionError("conversion needs TP=1/PP=1 groups; another layout is active")
        yield groups
        return
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(distributed._free_port()),
        RANK="0",
        WORLD_SIZE="1",
    )
    try:
        distributed.init_process_group("gloo", timeout_minutes=60)
        yield distributed.init_model_parallel(1, 1, 1)
    finally:
        distributed.destroy()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def precision_of(dtype: torch.dtype) -> str:
    """ModelLayout precision for a storage dtype (fp16 is held in fp32, losslessly)."""
    if dtype == torch.float16:
        return "fp32"
    if dtype not in _DTYPE_PRECISION:
        raise ConversionError(f"unsupported weight dtype {dtype} (fp32, bf16 or fp16)")
    return _DTYPE_PRECISION[dtype]


def build_tp1_model(m: ModelConfig, dtype: torch.dtype, groups: Any) -> torch.nn.Module:
    """The whole model (TP=1, PP=1) on CPU, local layer spec, parameters in ``dtype``.

    Weights are left uninitialised: the caller overwrites every one of them.
    """
    from longpo_megatron.model.gpt import ModelLayout, build_model

    layout = ModelLayout(
        tp=1,
        pp=1,
        cp=1,
        sequence_parallel=False,
        attention_backend="local",
        engine="cpu",
        precision=precision_of(dtype),
    )
    return build_model(m, layout, groups, init_weights=False).eval()


def model_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """Full megatron name -> parameter tensor of a TP=1/PP=1 model (no ``_extra_state``)."""
    return {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, Tensor) and not k.endswith("_extra_state")
    }


def save_weights_checkpoint(
    model: torch.nn.Module, root: str | Path, meta: dict[str, Any], groups: Any
) -> Path:
    """Write ``model`` (any TP/PP stage; collective) as a ``kind="weights"`` checkpoint.

    ``meta`` (plain types; e.g. ``model_config``, ``hf``) goes into the common state. Returns
    the published iteration directory under ``root``.
    """
    from longpo_megatron import checkpoint

    return checkpoint.save_weights(root, model, groups, extra=meta)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (with ``latest``), its ``latest`` file, or an iteration directory,
    verified against its checksum manifest."""
    from longpo_megatron import checkpoint
    from longpo_megatron.checkpoint import integrity

    ckpt = checkpoint.resolve(path)
    integrity.check(ckpt, True, use_dist=False)  # per-file checksums, before anything is read
    return ckpt


def read_common(ckpt_dir: Path) -> dict[str, Any]:
    """The common (non-sharded) state of an iteration directory (no process group needed)."""
    from longpo_megatron import checkpoint

    common = checkpoint.read_common(ckpt_dir)
    if common.get("format_version") != checkpoint.FORMAT_VERSION:
        raise ConversionError(
            f"{ckpt_dir}: format_version {common.get('format_version')!r}, "
            f"this code reads {checkpoint.FORMAT_VERSION}"
        )
    return common


def stored_dtype(ckpt_dir: Path) -> torch.dtype:
    """dtype of the stored model tensors (read from the checkpoint metadata)."""
    from longpo_megatron import checkpoint

    shapes = checkpoint.tensor_shapes(ckpt_dir)
    for key, (_, dtype) in shapes.items():
        if key.startswith(PREFIX) and dtype.is_floating_point:
            return dtype
    raise ConversionError(f"{ckpt_dir}: no model.* tensors in the checkpoint")


_TE_NORMS = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
)
"""Local-spec norm keys and their TransformerEngine fused-norm names (a TE run stores those)."""


def _match_stored(ckpt_dir: Path, ssd: dict[str, Any], stored: dict) -> None:
    """Point every request key at its stored name (TE aliases) and check global shapes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    missing = []
    for sh in ssd.values():
        for local, te in _TE_NORMS:
            if sh.key not in stored and sh.key.endswith(local):
                sh.key = sh.key[: -len(local)] + te
        if sh.key not in stored:
            missing.append(sh.key)
        elif isinstance(sh, ShardedTensor) and tuple(sh.global_shape) != stored[sh.key][0]:
            raise ConversionError(
                f"{ckpt_dir}: tensor {sh.key!r} is stored with shape {stored[sh.key][0]}, "
                f"the model config gives {tuple(sh.global_shape)}"
            )
    if missing:
        raise ConversionError(f"{ckpt_dir}: tensor(s) {sorted(set(missing))} not in checkpoint")


def _in_place_request(ssd: dict[str, Any]) -> dict[str, Any]:
    """Factories replaced by the ShardedTensors they build (views into the parameters).

    megatron's SwiGLU factory loads ``linear_fc1`` as gate/up chunk views, then concatenates a
    copy; loading the built views directly fills the parameter in place with no copy.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    out: dict[str, Any] = {}
    for name, sh in ssd.items():
        if isinstance(sh, ShardedTensorFactory):
            built = sh.build()
            parts = built if isinstance(built, (list, tuple)) else [built]
            out.update((f"{name}#part{i}", part) for i, part in enumerate(parts))
        else:
            out[name] = sh
    return out


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Load the model weights of ``ckpt_dir`` (any saved TP/PP layout) into a TP=1/PP=1 model.

    Every tensor is read in place into the parameters (peak memory: the model plus read
    buffers). Missing tensors and shape mismatches are reported by name; TE norm names load.
    """
    from megatron.core import dist_checkpointing

    from longpo_megatron import checkpoint
    from longpo_megatron.checkpoint import state, storage

    ssd = state.model_sharded_state_dict(model)
    _match_stored(ckpt_dir, ssd, checkpoint.tensor_shapes(ckpt_dir))
    request = _in_place_request(ssd)
    targets = {k: v.data for k, v in request.items()}
    loaded = dist_checkpointing.load(
        request,
        str(ckpt_dir),
        sharded_strategy=storage.SafeTorchDistLoadStrategy(),
        common_strategy=storage.SafeCommonLoadStrategy(),
    )
    for name, target in targets.items():
        value = loaded.get(name)
        if value is None:
            raise ConversionError(f"{ckpt_dir}: {name!r} was not loaded")
        if value.data_ptr() != target.data_ptr():  # not filled in place: copy it over
            target.copy_(value)
