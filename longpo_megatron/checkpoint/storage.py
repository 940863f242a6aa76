"""The torch_dist format on any device, read without unpickling arbitrary objects.

Writing: :class:`CpuTorchDistSaveStrategy` translates megatron ``ShardedTensor``s with megatron's
own helpers and calls stock ``torch.distributed.checkpoint.save`` with megatron's
``MCoreSavePlanner`` (the stock megatron writer calls ``torch.cuda.synchronize``). The result is
an ordinary ``torch_dist`` directory that stock ``dist_checkpointing.load`` reads.

Reading safely: torch's ``FileSystemReader`` unpickles ``.metadata`` with plain ``pickle`` and
DCP's planner loads byte items with ``torch.load(weights_only=False)``; megatron's common loader
relies on torch's *default* ``weights_only``. Every reader here replaces those with an
allow-listed unpickler (checkpoint-metadata classes and torch dtypes only) and
``weights_only=True``. Tensor data is always read with ``weights_only=True`` by torch itself.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, StateDict
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from longpo_megatron.checkpoint.paths import CheckpointError

COMMON_FILE = "common.pt"
"""megatron's common (non-sharded, rank-0) state file inside an iteration directory."""
METADATA_FILE = ".metadata"
"""DCP's pickled index of every stored tensor chunk."""

_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "megatron.core.dist_checkpointing.strategies.torch": frozenset({"MCoreMetadata"}),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "builtins": frozenset({"set", "frozenset", "slice", "object"}),
    "copyreg": frozenset({"_reconstructor"}),  # protocols 0-1 rebuild objects through it
}
"""Exactly the globals a DCP ``.metadata`` pickle may name: module -> attribute names. Names are
looked up as single attributes of these modules (never dotted paths), so nothing a module merely
imports (``os``, ``subprocess``...) is reachable."""

_TORCH_ENUM_TYPES = (torch.dtype, torch.layout, torch.memory_format)
"""``torch.<name>`` constants of these types (``torch.float32``...) are allowed too."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes of :data:`_ALLOWED_GLOBALS` and torch dtype/layout constants."""

    def find_class(self, module: str, name: str) -> Any:
        refused = pickle.UnpicklingError(f"refusing to unpickle {f'{module}.{name}'!r}")
        if "." in name or not name.isidentifier():
            raise refused  # pickle would walk a dotted path through module attributes
        # protocols 0-2 name Python 2 modules (copy_reg, __builtin__)
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return getattr(importlib.import_module(module), name)
        if module == "torch":
            found = torch.__dict__.get(name)
            if isinstance(found, _TORCH_ENUM_TYPES):
                return found
        raise refused

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise pickle.UnpicklingError("refusing a persistent id in checkpoint metadata")


def read_metadata(ckpt_dir: Union[str, Path]) -> Metadata:
    """DCP ``.metadata`` of an iteration directory, through the allow-listed unpickler."""
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete torch_dist checkpoint)")
    with open(path, "rb") as f:
        try:
            md = _MetadataUnpickler(f).load()
        except Exception as e:  # noqa: BLE001  (a crafted or torn file: any failure is refused)
            raise CheckpointError(
                f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})"
            ) from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}: holds {type(md).__name__}, not DCP Metadata")
    _check_storage_files(Path(ckpt_dir), md)
    return md


def _check_storage_files(ckpt_dir: Path, md: Metadata) -> None:
    """Every stored item lies inside its data file (a truncated shard is named, not read)."""
    needed: dict[str, int] = {}
    if not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{ckpt_dir / METADATA_FILE}: no storage index")
    for info in md.storage_data.values():
        name = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if not name or os.sep in name or name.startswith("."):
            raise CheckpointError(f"{ckpt_dir / METADATA_FILE}: bad data file name {name!r}")
        needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: data file missing (incomplete checkpoint)")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{path}: truncated ({size} bytes, the checkpoint metadata needs {end})"
            )


def read_common(ckpt_dir: Union[str, Path]) -> dict[str, Any]:
    """The common (non-sharded) state: ``torch.load(weights_only=True)`` of ``common.pt``."""
    path = Path(ckpt_dir) / COMMON_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete dist_checkpointing directory)")
    try:
        common = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused by weights_only loading: {e}") from None
    except Exception as e:  # noqa: BLE001  (truncated / corrupt zip: name the file)
        raise CheckpointError(
            f"{path}: unreadable (truncated or corrupt file; {type(e).__name__})"
        ) from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: common state is {type(common).__name__}, not a dict")
    return common


def tensor_shapes(ckpt_dir: Union[str, Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Stored tensor key -> (global shape, dtype), from the safely read metadata."""
    md = read_metadata(ckpt_dir)
    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata goes through the allow-listed unpickler (cached)."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        super().__init__(path)
        self._dir = Path(path)
        self._cached: Optional[Metadata] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:  # noqa: D102
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self._dir}: per-rank metadata files are not supported")
        if self._cached is None:
            md = read_metadata(self._dir)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            self._cached = md
        return self._cached


def _load_bytes_safely(read_item: ReadItem, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"byte item {read_item.dest_index.fqn!r} refused by weights_only loading: {e}"
        ) from None


class SafeMCoreLoadPlanner(mcore_torch.MCoreLoadPlanner):
    """megatron's load planner (global-shape validation) with ``weights_only`` byte items."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:  # noqa: D102
        self.state_dict[read_item.dest_index.fqn] = _load_bytes_safely(read_item, value)


class SafePlainLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner (plain tensors, no process group) with ``weights_only`` bytes."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:  # noqa: D102
        self.state_dict[read_item.dest_index.fqn] = _load_bytes_safely(read_item, value)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron's common loader with an explicit ``weights_only=True`` and no pickled objects."""

    def load_common(self, checkpoint_dir: Union[str, Path]) -> dict[str, Any]:  # noqa: D102
        return read_common(checkpoint_dir)

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> Any:
        raise CheckpointError(
            f"{checkpoint_dir}: ShardedObjects (pickled per-rank objects) are not loaded"
        )


class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """megatron's torch_dist loader (resharding) with the safe reader and planner."""

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> StateDict:
        """Same steps as the stock strategy; only the reader and planner differ."""
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        flexible = [t for t in tensors if not t.allow_shape_mismatch]
        mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
        orig = sharded_state_dict
        sharded_state_dict, flat_mapping, rename_mapping = (
            mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        )
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        dcp.load(
            pyt_state_dict,
            storage_reader=reader,
            planner=SafeMCoreLoadPlanner(
                shapes_validation_sharded_tensors=flexible,
                allow_shape_mismatch_sharded_tensors=mismatch_ok,
            ),
        )
        self.cached_global_metadata = reader.read_metadata()
        out = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        out = mcore_torch._replace_sharded_keys_with_state_dict_keys(
            out, flat_mapping, rename_mapping
        )
        mcore_torch._restore_dict_types(out, orig)
        return out

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Optional[Metadata] = None):
        """Tensor metadata from the safely read ``.metadata``."""
        if metadata is None:
            metadata = read_metadata(checkpoint_dir)
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir: Path) -> ShardedStateDict:
        """Tensors only: ShardedObjects are never loaded by this project."""
        return self.load_tensors_metadata(checkpoint_dir)


def _first_failure(err: CheckpointException) -> str:
    """The lowest rank's failure of a collective DCP call, as one phrase (full disk, EROFS...)."""
    rank = min(err.failures)
    exc = err.failures[rank][0] if isinstance(err.failures[rank], tuple) else err.failures[rank]
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"rank {rank}: {exc.strerror}{where}"
    return f"rank {rank}: {type(exc).__name__}: {exc}"


class CpuTorchDistSaveStrategy(SaveShardedStrategy):
    """Synchronous torch_dist writer: megatron's key translation + stock DCP save, no CUDA.

    ``thread_count`` writer threads per rank (files per rank); every file is fsynced.
    """

    def __init__(self, thread_count: int = 1) -> None:
        super().__init__("torch_dist", 1)
        self.thread_count = thread_count

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> None:
        """Write this rank's main-replica shards; rank 0 writes the global ``.metadata``."""
        sd, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sd, False)
        try:
            dcp.save(
                pyt_state_dict,
                storage_writer=FileSystemWriter(
                    str(checkpoint_dir), thread_count=self.thread_count, sync_files=True
                ),
                planner=mcore_torch.MCoreSavePlanner(flatten_state_dict=False),
            )
        except CheckpointException as e:  # collective: every rank raises the same error
            raise CheckpointError(f"{checkpoint_dir}: saving failed: {_first_failure(e)}") from None

    @property
    def can_handle_sharded_objects(self) -> bool:  # noqa: D102
        return True


def read_tensors(
    ckpt_dir: Union[str, Path], prefix: str = "", keys: Optional[list[str]] = None
) -> dict[str, torch.Tensor]:
    """Full (unsharded) stored tensors whose keys start with ``prefix`` (or exactly ``keys``).

    Needs no process group: the tensors are assembled from every rank's chunks on this process.
    Keys are the stored (checkpoint) keys, e.g. ``model.decoder.layers.mlp.linear_fc2.weight``
    with the layer axis first.
    """
    shapes = tensor_shapes(ckpt_dir)
    wanted = keys if keys is not None else [k for k in shapes if k.startswith(prefix)]
    missing = [k for k in wanted if k not in shapes]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: tensor(s) {missing} are not in the checkpoint")
    out = {k: torch.empty(shapes[k][0], dtype=shapes[k][1]) for k in wanted}
    if out:
        with warnings.catch_warnings():  # "assuming ... a single process": intended here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(
                out,
                storage_reader=SafeFileSystemReader(ckpt_dir),
                planner=SafePlainLoadPlanner(),
                no_dist=True,
            )
    return out
