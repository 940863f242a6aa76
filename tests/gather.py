"""Gather a TP/PP-sharded megatron-core GPTModel into ONE full state dict (run inside ranks).

The full dict uses megatron-core's names with GLOBAL layer indices and unsharded layouts:

* ``embedding.word_embeddings.weight`` / ``output_layer.weight`` -- vocab-sharded (dim 0);
* ``...linear_qkv.weight|bias`` -- column-parallel, dim 0 (whole query groups per TP rank);
* ``...mlp.linear_fc1.weight|bias`` -- column-parallel with a gated (SwiGLU) unit: each TP shard
  is ``[gate_shard; up_shard]``, so full = ``[cat(gate shards); cat(up shards)]``;
* ``...linear_proj.weight`` / ``...linear_fc2.weight`` -- row-parallel, dim 1;
* norms (and anything without ``tensor_model_parallel``) -- replicated, taken from TP rank 0.

Only the dp_rank == 0, cp_rank == 0 replica contributes (gradients are assumed already reduced).
TransformerEngine's fused-norm names (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``) are reported as ``input_layernorm.weight`` /
``pre_mlp_layernorm.weight``. This module does not import ``longpo_megatron``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["gather_full_state", "canonical_local_name"]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def _unwrap(model: Any) -> nn.Module:
    """Accept a module, a one-element list of modules, or wrappers exposing ``.module``."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("virtual pipeline chunks are not supported: pass one model chunk")
        model = model[0]
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model


def canonical_local_name(name: str) -> str:
    """Strip wrapper prefixes (``module.``) and map TE fused-norm names to the local ones."""
    while name.startswith("module."):
        name = name[len("module.") :]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _TE_ALIASES:
        name = f"decoder.layers.{m.group(1)}.{_TE_ALIASES[m.group(2)]}"
    return name


def _global_name(local_name: str, pp_rank: int, layers_per_stage: int) -> str:
    m = _LAYER_RE.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{pp_rank * layers_per_stage + int(m.group(1))}.{m.group(2)}"


def _value(p: Tensor, grads: bool) -> Tensor:
    if not grads:
        return p.detach()
    if p.grad is not None:
        return p.grad.detach()
    main_grad = getattr(p, "main_grad", None)
    if main_grad is not None:
        return main_grad.detach()
    return torch.zeros_like(p, memory_format=torch.contiguous_format).detach()


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def gather_full_state(
    model: nn.Module | list[nn.Module],
    groups: Any,
    *,
    grads: bool = False,
    num_layers: int,
    tie_word_embeddings: bool | None = None,
    gated_fc1: bool = True,
) -> dict[str, Tensor] | None:
    """Collective over the WORLD group: the full megatron-layout dict on global rank 0, else None.

    Args:
        model: this rank's GPTModel stage (or a one-element list of it); parameter names use
            LOCAL layer indices, TP-sharded params carry ``tensor_model_parallel`` and
            ``partition_dim``.
        groups: object with ``tp``, ``pp``, ``dp``, ``cp`` process groups.
        grads: gather ``.grad`` (or ``.main_grad`` when ``.grad`` is None; zeros if neither)
            instead of the parameters.
        num_layers: total decoder layers; global index = ``pp_rank * (num_layers // pp_size)
            + local_i``.
        tie_word_embeddings: drop ``output_layer.weight`` (the last stage's duplicated copy of
            the embedding). ``None``: drop it only when it is flagged ``shared`` by megatron.
        gated_fc1: ``linear_fc1`` shards are ``[gate; up]`` (SwiGLU); False -> plain dim-0 concat.

    Every rank of the world must call this. Tensors come back on CPU, in their own dtype.
    """
    module = _unwrap(model)
    tp_rank, tp_size = dist.get_rank(groups.tp), dist.get_world_size(groups.tp)
    pp_rank, pp_size = dist.get_rank(groups.pp), dist.get_world_size(groups.pp)
    dp_rank, cp_rank = dist.get_rank(groups.dp), dist.get_rank(groups.cp)
    if num_layers % pp_size:
        raise ValueError(f"num_layers={num_layers} is not divisible by pp_size={pp_size}")
    per_stage = num_layers // pp_size

    local: dict[str, tuple[Tensor, bool, int, bool]] = {}
    if dp_rank == 0 and cp_rank == 0:
        for raw_name, p in module.named_parameters():
            name = _global_name(canonical_local_name(raw_name), pp_rank, per_stage)
            is_tp = bool(getattr(p, "tensor_model_parallel", False))
            dim = int(getattr(p, "partition_dim", 0)) if is_tp else -1
            shared = bool(getattr(p, "shared", False))
            local[name] = (_value(p, grads).to("cpu", copy=True).contiguous(), is_tp, dim, shared)

    everything: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (tp_rank, pp_rank, dp_rank, cp_rank, local))
    if dist.get_rank() != 0:
        return None
    return _assemble(everything, tp_size, tie_word_embeddings, gated_fc1)


def _assemble(
    everything: list[Any], tp_size: int, tie_word_embeddings: bool | None, gated_fc1: bool
) -> dict[str, Tensor]:
    """Merge (tp, pp, dp, cp, shards) tuples from all ranks into full tensors."""
    shards: dict[str, dict[int, tuple[Tensor, bool, int, bool]]] = {}
    owner_pp: dict[str, int] = {}
    for tp_rank, pp_rank, dp_rank, cp_rank, local in everything:
        if dp_rank != 0 or cp_rank != 0:
            continue
        for name, entry in local.items():
            if name in owner_pp and owner_pp[name] != pp_rank:
                raise AssertionError(
                    f"{name} appears on pipeline stages {owner_pp[name]} and {pp_rank}; "
                    "check num_layers / layer naming"
                )
            owner_pp.setdefault(name, pp_rank)
            if tp_rank in shards.setdefault(name, {}):
                raise AssertionError(f"{name}: two shards for tp_rank {tp_rank}")
            shards[name][tp_rank] = entry

    full: dict[str, Tensor] = {}
    for name, by_tp in shards.items():
        first = by_tp[min(by_tp)]
        _, is_tp, dim, shared = first
        if name == "output_layer.weight":
            tied = tie_word_embeddings
            if tied is None:
                tied = shared and "embedding.word_embeddings.weight" in shards
            if tied:
                continue
        if not is_tp:
            if 0 not in by_tp:
                raise AssertionError(f"{name}: replicated param missing on tp_rank 0")
            full[name] = by_tp[0][0]
            continue
        missing = sorted(set(range(tp_size)) - set(by_tp))
        if missing:
            raise AssertionError(f"{name}: missing TP shards {missing}")
        parts = [by_tp[r][0] for r in range(tp_size)]
        if name in _VOCAB_PARALLEL:
            full[name] = torch.cat(parts, dim=0)
        elif gated_fc1 and _is_gated_fc1(name):
            halves = [torch.chunk(t, 2, dim=0) for t in parts]
            gate = torch.cat([h[0] for h in halves], dim=0)
            up = torch.cat([h[1] for h in halves], dim=0)
            full[name] = torch.cat((gate, up), dim=0)
        else:
            full[name] = torch.cat(parts, dim=dim)
    return full
