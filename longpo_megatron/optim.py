"""Learning-rate schedule and model-parallel-aware gradient norm (shared by both engines)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from longpo_megatron.config import OptimConfig


def warmup_steps(cfg: OptimConfig, train_iters: int) -> int:
    """Linear warm-up length in optimizer steps."""
    return int(cfg.warmup_fraction * train_iters)


def lr_at(step: int, cfg: OptimConfig, train_iters: int) -> float:
    """LR for the ``step``-th update (0-based): linear warm-up, then cosine/linear/constant."""
    warm = warmup_steps(cfg, train_iters)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    progress = min(1.0, (step - warm) / max(1, train_iters - warm))
    if cfg.lr_decay_style == "linear":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not norms or biases (megatron's default rule)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def grad_norm(
    params: Iterable[torch.nn.Parameter], tp_rank: int, mp_group: dist.ProcessGroup
) -> torch.Tensor:
    """Global L2 norm of gradients across TP and PP ranks.

    TP-sharded parameters count once per shard; TP-replicated ones (norm weights) count only on
    TP rank 0, so nothing is counted twice. The squared sum is all-reduced over the model-parallel
    (TP×PP) group; DP/CP replicas hold identical, already averaged gradients.
    """
    counted = [
        p.grad.detach().double().pow(2).sum()
        for p in params
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
    ]
    # one device-to-host copy, not one per parameter
    sq = torch.stack(counted).sum().cpu() if counted else torch.zeros((), dtype=torch.float64)
    if mp_group.size() > 1:
        dist.all_reduce(sq, group=mp_group)
    return sq.sqrt()


def clip_(params: Iterable[torch.nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients in place like ``torch.nn.utils.clip_grad_norm_`` given the global norm."""
    if max_norm <= 0:
        return
    coef = max_norm / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
