"""Step metrics: reduce per-micro-batch sums across DP, then print / TensorBoard / W&B."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from longpo_megatron.config import LoggingConfig
from longpo_megatron.loss.layer import METRIC_KEYS

CONSOLE_KEYS = (
    ("loss", "loss", ".4f"),
    ("nll", "nll", ".4f"),
    ("pref", "pref_loss", ".4f"),
    ("r_ch", "rewards/chosen", ".4f"),
    ("r_rej", "rewards/rejected", ".4f"),
    ("margin", "rewards/margins", ".4f"),
    ("acc", "rewards/accuracy", ".2f"),
    ("lr", "lr", ".3e"),
    ("gnorm", "grad_norm", ".3f"),
    ("tok/s", "tokens_per_s", ".0f"),
    ("needle", "probe/needle_greedy_acc", ".2f"),
)


def reduce_step_metrics(
    per_micro: list[dict[str, Tensor]], dp_group: dist.ProcessGroup
) -> Optional[dict[str, float]]:
    """Means over every pair of the global batch (last-stage ranks; None elsewhere)."""
    if not per_micro:
        return None
    keys = (*METRIC_KEYS, "pairs")
    vec = torch.stack([sum(m[k].double().sum() for m in per_micro) for k in keys])
    if dp_group.size() > 1:
        dist.all_reduce(vec, group=dp_group)
    pairs = float(vec[-1])
    return {k: float(v) / pairs for k, v in zip(keys[:-1], vec[:-1])} | {"pairs": pairs}


class MetricsLogger:
    """Console line, ``metrics.jsonl``, TensorBoard scalars and optional W&B on one rank."""

    def __init__(self, cfg: LoggingConfig, enabled: bool, run_config: dict[str, Any]) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tb"))
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, name=cfg.wandb_run_name, config=run_config
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write one step's metrics everywhere configured."""
        if not self.enabled:
            return
        parts = [f"step {step:>6d}"]
        parts += [f"{name} {values[k]:{fmt}}" for name, k, fmt in CONSOLE_KEYS if k in values]
        print(" | ".join(parts), flush=True)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
