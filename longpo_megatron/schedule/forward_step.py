"""megatron's ``forward_step`` contract, shared by the CPU schedule and Megatron's schedules.

``forward_step(data_iterator, model) -> (output_tensor, loss_func)``; on the last pipeline stage
the schedule calls ``loss_func(output_tensor) -> (loss, metrics)`` (the 2-tuple form: the schedule
multiplies by the CP size and divides by the number of micro-batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor

from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups, sequence_logps

Batch = dict[str, Tensor]
ForwardStep = Callable[[Iterator[Batch], torch.nn.Module], tuple[Tensor, Callable]]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost model under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _run_model(model: torch.nn.Module, batch: Batch) -> Tensor:
    mask = batch.get("attention_mask") if getattr(unwrap(model), "takes_mask_spec", True) else None
    return model(batch["tokens"], batch["position_ids"], mask)


def make_train_forward_step(loss_layer: LongPOLossLayer) -> ForwardStep:
    """forward_step computing the LongPO loss and its metrics on the last stage."""

    def loss_func(batch: Batch, model: torch.nn.Module, hidden: Tensor):
        return loss_layer(hidden, batch, unwrap(model).output_weight())

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = next(data_iterator)
        return _run_model(model, batch), partial(loss_func, batch, model)

    return forward_step


def make_scoring_forward_step(chunk_size: int, groups: LossGroups) -> ForwardStep:
    """forward_step returning per row Σ response log-probs, the per-token log-probs and the
    response mask (``{"logps", "tokens", "mask", "owner"}``)."""

    def loss_func(batch: Batch, model: torch.nn.Module, hidden: Tensor):
        weight = unwrap(model).output_weight()
        sums, tokens = sequence_logps(hidden, batch, weight, chunk_size, groups)
        out = {"logps": sums.detach(), "tokens": tokens.detach(), "owner": batch["owner"]}
        return sums.sum() * 0.0, out | {"mask": batch["response_mask"]}

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = next(data_iterator)
        return _run_model(model, batch), partial(loss_func, batch, model)

    return forward_step
