"""Step metrics: reduce per-micro-batch sums across DP, then print / TensorBoard / W&B.

Also what a run leaves in ``logging.output_dir`` (docs/observability.md): ``config.yaml`` (the
resolved config of the latest start), ``metrics.jsonl`` (one line per logged step; after a
resume, lines past the resumed step are dropped so no step appears twice), ``logs/run-NNN.log``
(the logging rank's console output, one file per start/restart) and ``tb/``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any, Optional

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
    ("TFLOP/s/gpu", "tflops_per_gpu", ".2f"),
    ("mfu", "mfu", ".3f"),
    ("pad", "padding_fraction", ".2f"),
    ("mem GiB", "mem/peak_allocated_gib", ".1f"),
    ("ckpt block s", "checkpoint/blocking_s", ".2f"),
    ("valid loss", "valid/loss", ".4f"),
    ("valid acc", "valid/rewards/accuracy", ".2f"),
    ("valid margin", "valid/rewards/margins", ".4f"),
    ("needle", "probe/needle_greedy_acc", ".2f"),
)
"""(console name, metric key, format) of the console line; ``eta_s`` is printed as h:mm:ss."""


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


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (ETA on the console)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def drop_entries_after(path: str, step: int) -> list[int]:
    """Rewrite ``metrics.jsonl`` without the entries past ``step`` (atomically); returns the
    dropped steps. A resumed run logs those steps again."""
    if not os.path.isfile(path):
        return []
    kept, dropped = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                kept.append(line)  # not ours to judge: keep it as it is
                continue
            (dropped.append(entry_step) if entry_step > step else kept.append(line))
    if dropped:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        os.replace(tmp, path)
    return dropped


def _tb_tag(key: str) -> str:
    """TensorBoard / W&B name: ``valid/*`` keys keep theirs, the rest go under ``train/``."""
    return key if key.startswith("valid/") else f"train/{key}"


class MetricsLogger:
    """Console line, ``metrics.jsonl``, TensorBoard scalars and optional W&B on one rank.

    ``resume_step``: entries of ``metrics.jsonl`` past it are dropped (and said). ``wandb_id``:
    the W&B run to create or resume (stored in the checkpoint's train state, so a requeued job
    continues the same W&B run).
    """

    def __init__(
        self,
        cfg: LoggingConfig,
        enabled: bool,
        run_config: dict[str, Any],
        resume_step: int = 0,
        wandb_id: Optional[str] = None,
    ) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_resolved_config(cfg.output_dir, run_config)
        path = os.path.join(cfg.output_dir, "metrics.jsonl")
        dropped = drop_entries_after(path, resume_step)
        if dropped:
            print(
                f"metrics.jsonl: dropped {len(dropped)} entries past step {resume_step} (steps "
                f"{min(dropped)}-{max(dropped)}); they are logged again from this run",
                flush=True,
            )
        self.jsonl = open(path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tb"))
        if cfg.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_run_name,
                config=run_config,
                id=wandb_id,
                resume="allow",
            )

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write one step's metrics everywhere configured."""
        if not self.enabled:
            return
        parts = [f"step {step:>6d}"]
        parts += [f"{name} {values[k]:{fmt}}" for name, k, fmt in CONSOLE_KEYS if k in values]
        if "eta_s" in values:
            parts.append(f"eta {format_duration(values['eta_s'])}")
        print(" | ".join(parts), flush=True)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(_tb_tag(k), v, step)
        if self.wandb is not None:
            self.wandb.log({_tb_tag(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_resolved_config(output_dir: str, run_config: dict[str, Any]) -> str:
    """``<output_dir>/config.yaml``: the fully resolved config this start runs with."""
    from omegaconf import OmegaConf

    path = os.path.join(output_dir, "config.yaml")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(run_config)))
    os.replace(tmp, path)
    return path


class _Tee:
    """A text stream writing to the console stream and the run log."""

    def __init__(self, console: IO[str], log: IO[str]) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


class RunLog:
    """``<output_dir>/logs/run-NNN.log``: this start's console output (stdout and stderr), one
    new file per start or restart (NNN counts up), headed by the job id and restart count."""

    def __init__(self, output_dir: str) -> None:
        logs = os.path.join(output_dir, "logs")
        os.makedirs(logs, exist_ok=True)
        n = 0
        while True:
            self.path = os.path.join(logs, f"run-{n:03d}.log")
            try:
                self.file = open(self.path, "x", buffering=1)
                break
            except FileExistsError:
                n += 1
        env = os.environ
        self.file.write(
            f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} start {n}: slurm job "
            f"{env.get('SLURM_JOB_ID', '-')} restart {env.get('SLURM_RESTART_COUNT', '-')}, "
            f"pid {os.getpid()}\n"
        )
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self.file)
        sys.stderr = _Tee(sys.stderr, self.file)

    def close(self) -> None:
        """Restore the console streams and close the file."""
        if sys.stdout is not self._saved[0]:
            sys.stdout, sys.stderr = self._saved
        self.file.close()
