"""Collective save and load of one checkpoint (every rank of the job calls them together)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from longpo_megatron.checkpoint import integrity, paths, state, storage
from longpo_megatron.checkpoint.paths import CheckpointError

if TYPE_CHECKING:
    from longpo_megatron.checkpoint.async_save import AsyncCheckpointWriter

FORMAT_VERSION = 1
KINDS = ("training", "weights")
RESERVED_KEYS = (
    "format_version",
    "kind",
    "train_state",
    "rng",
    "reference_table",
    "config",
    "layout",
    "model",
    "optimizer",
)
"""Top-level keys of the saved state owned by this module (``extra`` may not use them)."""
_TE_ALIASES = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
)
"""Local-spec norm keys and their TransformerEngine fused-norm names (either loads the other)."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load` restored (and the common state it read)."""

    path: Path
    """The iteration directory that was loaded."""
    kind: str
    """training | weights"""
    train_state: dict[str, Any]
    """``{"step", "consumed_pairs", "sampler"}``; step 0 and an empty sampler for weights."""
    reference_table: Optional[torch.Tensor]
    """[N, 2] float64 reference scores (training checkpoints), else None."""
    config: Optional[dict[str, Any]]
    """Resolved run config stored with the checkpoint, if any."""
    optimizer_restored: bool = False
    rng_restored: bool = False
    common: dict[str, Any] = field(default_factory=dict, repr=False)
    """The whole common state (converter metadata such as ``model_config`` included)."""


def layout_of(groups: Any) -> dict[str, int]:
    """The parallel layout a checkpoint was saved with (RNG states are only valid for it)."""
    return {
        "world_size": dist.get_world_size(),
        "tp": groups.tp_size,
        "pp": groups.pp_size,
        "cp": groups.cp_size,
        "dp": groups.dp_size,
    }


def _empty_train_state() -> dict[str, Any]:
    return {"step": 0, "consumed_pairs": 0, "sampler": {}}


def _save_state(
    kind: str,
    model: torch.nn.Module,
    groups: Any,
    optimizer: Any,
    common: dict[str, Any],
) -> dict[str, Any]:
    """The sharded + common state dict handed to ``dist_checkpointing.save``."""
    model_ssd = state.model_sharded_state_dict(model)
    out: dict[str, Any] = {"model": model_ssd, "format_version": FORMAT_VERSION, "kind": kind}
    out["layout"] = layout_of(groups)
    if kind == "training":
        if optimizer is None:
            raise CheckpointError("a training checkpoint needs the optimizer")
        out["optimizer"] = state.optimizer_sharded_state_dict(optimizer, model_ssd, False)
        out["rng"] = state.gather_rng()
    out.update(common)
    return out


def save(
    root: Union[str, Path],
    step: int,
    model: torch.nn.Module,
    groups: Any,
    *,
    optimizer: Any = None,
    train_state: Optional[dict[str, Any]] = None,
    reference_table: Optional[torch.Tensor] = None,
    config: Optional[dict[str, Any]] = None,
    kind: str = "training",
    keep_last: int = 2,
    extra: Optional[dict[str, Any]] = None,
    thread_count: int = 1,
    async_writer: Optional[AsyncCheckpointWriter] = None,
    checksums: bool = True,
) -> Path:
    """Save ``<root>/iter_<step>`` atomically, update ``latest``, keep the last ``keep_last``.

    Collective: every rank calls it. ``extra`` (plain types / tensors) is added to the common
    state, e.g. converter metadata. Returns the iteration directory. With ``async_writer`` the
    shards are written in the background and the directory is published by a later
    ``async_writer.poll()`` / ``wait()`` (a save still in flight is finished first).
    ``checksums`` writes the per-file checksum manifest (:mod:`.integrity`) into the directory
    before it is published.
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r}: must be one of {list(KINDS)}")
    clash = sorted(set(extra or {}) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra checkpoint keys {clash} are reserved")
    root = Path(root)
    if async_writer is not None:
        async_writer.wait()  # one save in flight; its .tmp must survive clear_leftovers
    final = root / paths.iter_dir_name(step)
    tmp = final.with_name(final.name + paths.TMP_SUFFIX)
    common = {
        "train_state": train_state if train_state is not None else _empty_train_state(),
        "reference_table": reference_table,
        "config": config,
        **(extra or {}),
    }
    _on_rank0_agreed(partial(_prepare_tmp, root, tmp, common), f"preparing {tmp}")
    to_save = _save_state(kind, model, groups, optimizer, common)
    if async_writer is not None:
        strategy = async_writer.strategy(getattr(groups, "dp_cp", None))
        request = dist_checkpointing.save(
            to_save, str(tmp), sharded_strategy=strategy, async_sharded_save=True
        )
        request.add_finalize_fn(partial(_publish, root, tmp, final, keep_last, checksums))
        async_writer.schedule(request, final)
        return final
    strategy = storage.CpuTorchDistSaveStrategy(thread_count)
    dist_checkpointing.save(to_save, str(tmp), sharded_strategy=strategy)  # ends in a barrier
    _publish(root, tmp, final, keep_last, checksums)
    return final


def _publish(root: Path, tmp: Path, final: Path, keep_last: int, checksums: bool = True) -> None:
    """After every rank's shards are written: the checksum manifest (collective), then rank 0
    publishes ``tmp`` as ``final`` (moving ``latest``) and prunes; then all ranks barrier.
    Shared by synchronous and async saves."""
    if checksums:
        integrity.write_manifest(tmp, use_dist=True)  # collective; before publication
    publish = partial(_publish_and_prune, root, tmp, final, keep_last)
    _on_rank0_agreed(publish, f"publishing {final}")


def _publish_and_prune(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0's part of :func:`_publish`."""
    paths.publish(root, tmp, final)
    paths.prune(root, keep_last)


def _prepare_tmp(root: Path, tmp: Path, common: dict[str, Any]) -> None:
    """Rank 0: create ``tmp`` and write the common state into it once as a probe.

    megatron writes ``common.pt`` on rank 0 alone, outside any collective; if that write failed
    (full disk, quota, read-only mount) rank 0 would raise while the other ranks wait in the
    sharded save until the collective timeout. Writing the same state here first, where the
    failure is agreed on by every rank, turns that hang into one named error on every rank.
    The probe is removed again: megatron expects an empty directory (else it warns that it is
    overwriting a corrupted checkpoint) and writes its own copy.
    """
    root.mkdir(parents=True, exist_ok=True)
    paths.clear_leftovers(root)
    tmp.mkdir()
    probe = tmp / storage.COMMON_FILE
    try:
        with open(probe, "wb") as f:
            torch.save(common, f)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


def _on_rank0_agreed(fn: Callable[[], None], what: str) -> None:
    """Run ``fn`` on rank 0 and let every rank raise the same error if it failed with an
    ``OSError`` (collective; replaces a barrier). Other exceptions are bugs and propagate on
    rank 0 after the others were told to stop."""
    failure: list[Optional[str]] = [None]
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            fn()
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            failure[0] = f"{what} failed: rank 0: {e.strerror or e}{where}"
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the agreement
            failure[0], error = f"{what} failed on rank 0 ({type(e).__name__}: {e})", e
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise CheckpointError(failure[0])


def _alias(key: str, stored: dict[str, Any]) -> str:
    """``key`` itself, or its TE/local norm alias when only that is stored."""
    if key in stored:
        return key
    for a, b in _TE_ALIASES:
        for src, dst in ((a, b), (b, a)):
            if key.endswith(src) and key[: -len(src)] + dst in stored:
                return key[: -len(src)] + dst
    return key


def _check_request(ckpt: Path, request: dict[str, Any], stored: dict[str, Any]) -> None:
    """Every requested tensor exists with the same global shape (TE/local aliases resolved).

    Errors name the checkpoint and the key, before any collective load starts.
    """
    missing = []
    for sh in nested_values(request):
        if isinstance(sh, ShardedTensorFactory):
            sh.key = _alias(sh.key, stored)
            if sh.key not in stored:
                missing.append(sh.key)
        elif isinstance(sh, ShardedTensor):
            sh.key = _alias(sh.key, stored)
            if sh.key not in stored:
                missing.append(sh.key)
            elif tuple(sh.global_shape) != stored[sh.key][0]:
                raise CheckpointError(
                    f"{ckpt}: tensor {sh.key!r} is stored with shape {stored[sh.key][0]} but "
                    f"this model expects {tuple(sh.global_shape)} (different model config?)"
                )
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt}: {len(missing)} tensor(s) not in the checkpoint: {shown}")


def _read_checked_common(ckpt: Path) -> dict[str, Any]:
    common = storage.read_common(ckpt)
    version = common.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt}: format_version {version!r}; this code reads version {FORMAT_VERSION}"
        )
    if common.get("kind") not in KINDS:
        raise CheckpointError(f"{ckpt}: kind {common.get('kind')!r} is not one of {list(KINDS)}")
    return common


def _has_optimizer(stored: dict[str, Any]) -> bool:
    return any(k.startswith("optimizer.") for k in stored)


def _restore_rng(common: dict[str, Any], groups: Any) -> bool:
    """Restore this rank's RNG states when the layout is the saved one (else keep the seeds)."""
    rng = common.get("rng")
    if not rng or common.get("layout") != layout_of(groups) or len(rng) != dist.get_world_size():
        return False
    state.restore_rng(rng[dist.get_rank()])
    return True


def load(
    path: Union[str, Path],
    model: torch.nn.Module,
    groups: Any,
    *,
    optimizer: Any = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint (root, ``latest`` file or iter dir) into ``model`` (+ ``optimizer``).

    Collective. Any TP/PP layout loads any other (megatron reshards). A ``weights`` checkpoint
    restores weights only (fresh optimizer, step 0); a ``training`` one also the optimizer and,
    under the saved layout, each rank's RNG states. Nothing is unpickled beyond tensors, plain
    containers and checkpoint-metadata classes. ``verify`` checks the per-file checksums
    first (a checkpoint saved without them loads with a warning).
    """
    ckpt = paths.resolve(path)
    integrity.check(ckpt, verify, use_dist=True)  # collective; before any file is read
    common = _read_checked_common(ckpt)
    kind = common["kind"]
    stored = storage.tensor_shapes(ckpt)
    model_ssd = state.model_sharded_state_dict(model)
    request: dict[str, Any] = {"model": model_ssd}
    # a training checkpoint saved before the first optimizer step has no optimizer tensors
    with_optim = optimizer is not None and kind == "training" and _has_optimizer(stored)
    if with_optim:
        request["optimizer"] = state.optimizer_sharded_state_dict(optimizer, model_ssd, True)
    _check_request(ckpt, request, stored)
    loaded = dist_checkpointing.load(
        request,
        str(ckpt),
        sharded_strategy=storage.SafeTorchDistLoadStrategy(),
        common_strategy=storage.SafeCommonLoadStrategy(),
    )
    state.apply_model_state(model, loaded["model"], str(ckpt))
    if with_optim:
        state.load_optimizer(optimizer, loaded["optimizer"])
    else:
        state.refresh_after_weights_load(optimizer)
    training = kind == "training"
    return LoadedCheckpoint(
        path=ckpt,
        kind=kind,
        train_state=dict(common.get("train_state") or {}) if training else _empty_train_state(),
        reference_table=common.get("reference_table") if training else None,
        config=common.get("config"),
        optimizer_restored=with_optim,
        rng_restored=training and restore_rng and _restore_rng(common, groups),
        common=common,
    )


def config_differences(
    saved: Optional[dict[str, Any]],
    current: dict[str, Any],
    sections: tuple[str, ...] = ("model", "longpo", "reference", "optim", "data", "train"),
) -> list[str]:
    """``"key: saved -> current"`` for every differing leaf of ``sections`` (resume warnings)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")

    for name in sections:
        walk((saved or {}).get(name), current.get(name), name)
    return out


def save_weights(
    root: Union[str, Path],
    model: torch.nn.Module,
    groups: Any,
    *,
    config: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
    step: int = 0,
) -> Path:
    """A ``kind="weights"`` checkpoint (model keys only), e.g. from the HF converter."""
    return save(root, step, model, groups, kind="weights", config=config, extra=extra)


__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "LoadedCheckpoint",
    "config_differences",
    "load",
    "save",
    "save_weights",
]
