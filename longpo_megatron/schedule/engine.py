"""Training engines: the seam between the shared loop and the hardware path.

- :class:`CpuEngine`: project pipeline schedule, gradients averaged over DP×CP with one
  coalesced all-reduce, torch AdamW, model-parallel-aware clipping. Runs anywhere (gloo).
- :class:`MegatronEngine`: megatron's ``get_forward_backward_func`` schedules, Megatron DDP,
  ``get_megatron_optimizer`` (distributed optimizer) — the GPU cluster path.

Both expose ``train_step(forward_step, batches, lr)``, ``evaluate(forward_step, batches)``
(forward only, no gradients: held-out validation), ``model`` and ``optimizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from longpo_megatron.config import OptimConfig
from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.optim import clip_, grad_norm, param_groups
from longpo_megatron.schedule.cpu_pipeline import CpuPipelineSchedule
from longpo_megatron.schedule.forward_step import Batch, ForwardStep


@dataclass
class StepResult:
    """What one optimizer step reports."""

    metrics: list[dict[str, Tensor]]
    """Per-micro-batch metric sums (last pipeline stage only; empty elsewhere)."""
    grad_norm: float
    """Global pre-clip gradient L2 norm."""
    skipped: bool = False
    """True when the optimizer skipped the update (non-finite gradients)."""


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def allreduce_grads(params: list[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """Average gradients over ``group`` in one flat buffer (the DP×CP replicas)."""
    grads = [p.grad for p in params if p.grad is not None]
    if group.size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(group.size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class CpuEngine:
    """Project schedule + torch optimizer (exact fp32 arithmetic on CPU, also runs on CUDA)."""

    def __init__(self, model: torch.nn.Module, groups: ParallelGroups, cfg: OptimConfig) -> None:
        self.model = model
        self.groups = groups
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.params, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.schedule = CpuPipelineSchedule(groups, dtype, device)

    def train_step(self, forward_step: ForwardStep, batches: list[Batch], lr: float) -> StepResult:
        for p in self.params:
            p.grad = None
        self.model.train()
        metrics = self.schedule(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=len(batches),
        )
        allreduce_grads(self.params, self.groups.dp_cp)
        norm = grad_norm(self.params, self.groups.tp_rank, self.groups.mp)
        if not torch.isfinite(norm):
            return StepResult(metrics, float(norm), skipped=True)
        clip_(self.params, norm, self.cfg.clip_grad)
        _set_lr(self.optimizer, lr)
        self.optimizer.step()
        return StepResult(metrics, float(norm))

    def evaluate(self, forward_step: ForwardStep, batches: list[Batch]) -> list[dict[str, Tensor]]:
        """Forward-only pass in eval mode (no gradients); per-micro-batch metrics, last stage."""
        self.model.eval()
        try:
            return self.schedule(
                forward_step_func=forward_step,
                data_iterator=iter(batches),
                model=self.model,
                num_microbatches=len(batches),
                forward_only=True,
            )
        finally:
            self.model.train()
