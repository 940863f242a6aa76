"""Checkpoints: megatron ``dist_checkpointing`` (torch_dist) directories with the training state.

Format contract: ``docs/checkpoint-format.md``. Public API:

* :func:`save` / :func:`load` -- collective; any TP/PP layout loads any other;
* :class:`AsyncCheckpointWriter` -- pass to :func:`save` to write in the background;
* :func:`save_weights` -- a ``kind="weights"`` checkpoint (model keys only, e.g. from HF);
* :func:`resolve` -- root / ``latest`` / iter dir -> the iteration directory;
* :func:`read_common`, :func:`read_tensors`, :func:`tensor_shapes` -- single-process, no process
  group, never unpickling arbitrary objects (export and inspection tools).
"""

from longpo_megatron.checkpoint.async_save import AsyncCheckpointWriter, FinishedSave
from longpo_megatron.checkpoint.core import (
    FORMAT_VERSION,
    KINDS,
    LoadedCheckpoint,
    config_differences,
    layout_of,
    load,
    save,
    save_weights,
)
from longpo_megatron.checkpoint.paths import (
    LATEST,
    CheckpointError,
    complete_steps,
    iter_dir_name,
    resolve,
)
from longpo_megatron.checkpoint.state import MODEL_PREFIX
from longpo_megatron.checkpoint.storage import read_common, read_tensors, tensor_shapes

__all__ = [
    "AsyncCheckpointWriter",
    "FinishedSave",
    "FORMAT_VERSION",
    "KINDS",
    "LATEST",
    "MODEL_PREFIX",
    "CheckpointError",
    "LoadedCheckpoint",
    "complete_steps",
    "config_differences",
    "iter_dir_name",
    "layout_of",
    "load",
    "read_common",
    "read_tensors",
    "resolve",
    "save",
    "save_weights",
    "tensor_shapes",
]
