"""What goes into a checkpoint besides paths: model and optimizer sharded state, RNG states.

Model: ``model.sharded_state_dict(prefix="model.")`` without ``_extra_state`` entries (those are
pickled ShardedObjects; the local and bf16 TE layers keep nothing in them).

Optimizer:

* torch optimizers (the CPU engine's AdamW): megatron's FP32Optimizer layout -- every per-param
  state tensor (``exp_avg``, ``exp_avg_sq``) becomes a ShardedTensor that mirrors its parameter's
  sharding (key ``optimizer.state.<name>.<param key>``), so it reshards with the parameter; the
  per-param ``step`` (equal for all params) is stored once as ``optimizer.state.common_step``;
  ``param_groups`` hyper-parameters go to the common state.
* megatron optimizers (the GPU engine): ``optimizer.sharded_state_dict(model_sharded_state_dict,
  is_loading, metadata=...)`` with the ``fully_reshardable`` distributed-optimizer format, and
  ``optimizer.load_state_dict`` to restore, as megatron's own checkpointing does.

RNG: per rank, torch CPU (+ CUDA and megatron's CUDA RNG tracker when present), python
``random`` and numpy's global generator, as plain tensors/ints/floats (weights_only-loadable).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)

from longpo_megatron.checkpoint.paths import CheckpointError

MODEL_PREFIX = "model."
"""Prefix of every model key (state-dict and checkpoint keys)."""
MEGATRON_OPTIM_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}
"""``metadata`` for megatron's ``optimizer.sharded_state_dict`` (reshardable over TP/PP/DP)."""


def unwrap_model(model: Any) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_sharded_state_dict(model: torch.nn.Module) -> ShardedStateDict:
    """This rank's ``model.*`` ShardedTensors (and factories), without ``_extra_state``."""
    ssd = unwrap_model(model).sharded_state_dict(prefix=MODEL_PREFIX)
    return {k: v for k, v in ssd.items() if not k.endswith("_extra_state")}


def apply_model_state(model: torch.nn.Module, loaded: dict[str, Any], where: str) -> None:
    """Copy loaded ``model.*`` tensors into ``model``; anything missing is an error."""
    state = {k[len(MODEL_PREFIX) :]: v for k, v in loaded.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = unwrap_model(model).load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{where}: model keys missing {missing}, unexpected {unexpected}")


# ---- optimizer ---------------------------------------------------------------------------------


def is_torch_optimizer(optimizer: Any) -> bool:
    """True for a plain ``torch.optim`` optimizer (CPU engine), False for megatron's."""
    return isinstance(optimizer, torch.optim.Optimizer)


def _torch_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero Adam/AdamW state for params without any (so a load has tensors to fill)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if st:
                continue
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _common_step(state: dict[int, dict[str, Any]]) -> Any:
    steps = [s["step"] for s in state.values() if "step" in s]
    for s in steps[1:]:
        if not torch.equal(torch.as_tensor(s), torch.as_tensor(steps[0])):
            raise CheckpointError("optimizer step differs between parameters; cannot save it once")
    return steps[0] if steps else None


def torch_optimizer_sharded_state_dict(
    optimizer: torch.optim.Optimizer, model_ssd: ShardedStateDict, is_loading: bool
) -> dict[str, Any]:
    """megatron FP32Optimizer-style sharded state of a torch optimizer."""
    if is_loading:
        _init_adam_state(optimizer)
    sd = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_ssd, _torch_params(optimizer))
    untracked = [i for i in sd["state"] if i not in id_map]
    if untracked:
        raise CheckpointError(f"optimizer params {untracked} have no model ShardedTensor")
    step = _common_step(sd["state"])
    optim_state_to_sharding_state(sd, id_map, exclude_keys=("step",))
    if step is not None:
        sd["state"]["common_step"] = step
    return sd


def load_torch_optimizer(optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> None:
    """Restore a torch optimizer from :func:`torch_optimizer_sharded_state_dict` output.

    Current ``param_groups`` hyper-parameters are kept (the config decides them); only the
    per-param state is taken from the checkpoint.
    """
    state = dict(loaded["state"])
    step = state.pop("common_step", None)
    for per_param in state.values():
        if step is not None:
            per_param["step"] = step.clone() if isinstance(step, torch.Tensor) else step
    sd = optimizer.state_dict()
    if set(state) != set(sd["state"]) and sd["state"]:
        raise CheckpointError("optimizer state ids do not match the optimizer's parameters")
    sd["state"] = state
    optimizer.load_state_dict(sd)


def optimizer_sharded_state_dict(
    optimizer: Any, model_ssd: ShardedStateDict, is_loading: bool
) -> dict[str, Any]:
    """Sharded optimizer state for either engine's optimizer."""
    if is_torch_optimizer(optimizer):
        return torch_optimizer_sharded_state_dict(optimizer, model_ssd, is_loading)
    return optimizer.sharded_state_dict(
        model_ssd, is_loading=is_loading, metadata=dict(MEGATRON_OPTIM_METADATA)
    )


def load_optimizer(optimizer: Any, loaded: dict[str, Any]) -> None:
    """Restore either engine's optimizer from its loaded sharded state."""
    if is_torch_optimizer(optimizer):
        load_torch_optimizer(optimizer, loaded)
    else:
        optimizer.load_state_dict(loaded)


def refresh_after_weights_load(optimizer: Any) -> None:
    """After loading weights only: megatron optimizers re-copy fp32 main params from the model."""
    if optimizer is not None and not is_torch_optimizer(optimizer):
        optimizer.reload_model_params()


# ---- RNG ---------------------------------------------------------------------------------------


def _cuda_rng() -> dict[str, Any]:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    out: dict[str, Any] = {"cuda": [s.clone() for s in torch.cuda.get_rng_state_all()]}
    try:
        from megatron.core import tensor_parallel

        out["cuda_tracker"] = dict(tensor_parallel.get_cuda_rng_tracker().get_states())
    except Exception:  # tracker not initialised (CPU engine on a CUDA machine)
        pass
    return out


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain numbers."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    py_state = torch.tensor(mt, dtype=torch.int64)
    return {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": version, "state": py_state, "gauss": gauss},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        **_cuda_rng(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng`, indexed by global rank (the same list on all ranks)."""
    mine = capture_rng()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, mine)
    return everything
