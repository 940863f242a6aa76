"""GPU engine: megatron's pipeline schedules, Megatron DDP and the (distributed) Megatron optimizer.

Imported only when ``parallel.engine=gpu``; its pieces allocate CUDA buffers (see
``shared/docs/megatron-core-on-cpu.md``). The forward_step contract, the loss layer, the LR
schedule and the training loop are the same objects the CPU engine uses.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from longpo_megatron.config import OptimConfig
from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.schedule.engine import StepResult, _set_lr
from longpo_megatron.schedule.forward_step import Batch, ForwardStep


class MegatronEngine:
    """Float16Module → Megatron DDP → ``get_megatron_optimizer``; schedules from megatron."""

    def __init__(
        self, model: torch.nn.Module, groups: ParallelGroups, cfg: OptimConfig, micro_pairs: int
    ) -> None:
        tcfg = model.config
        self.groups = groups
        self.micro_rows = 2 * micro_pairs
        if tcfg.bf16:
            model = Float16Module(tcfg, model)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(
            config=tcfg, ddp_config=ddp_cfg, module=model, pg_collection=groups.pg_collection
        )
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=tcfg.bf16,
            params_dtype=tcfg.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.no_sync_func = self.model.no_sync
        tcfg.grad_scale_func = self.optimizer.scale_loss
        tcfg.variable_seq_lengths = True
        self.forward_backward = get_forward_backward_func()

    def _run(self, forward_step: ForwardStep, batches: list[Batch], forward_only: bool = False):
        seq = max(int(b["tokens"].shape[1]) for b in batches)
        return self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=seq,
            micro_batch_size=self.micro_rows,
            forward_only=forward_only,
        )

    def train_step(self, forward_step: ForwardStep, batches: list[Batch], lr: float) -> StepResult:
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = self._run(forward_step, batches)
        _set_lr(self.optimizer, lr)
        ok, norm, _ = self.optimizer.step()
        return StepResult(list(metrics), float(norm or 0.0), skipped=not ok)

    def evaluate(self, forward_step: ForwardStep, batches: list[Batch]) -> list[dict]:
        """Forward-only pass of megatron's schedule in eval mode; per-micro-batch metrics."""
        if not batches:
            return []
        self.model.eval()
        try:
            with torch.no_grad():
                return list(self._run(forward_step, batches, forward_only=True))
        finally:
            self.model.train()
