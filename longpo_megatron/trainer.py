"""The training loop: build every stage from the config, then step, log and close.

Everything here is engine-agnostic; the CPU/GPU differences live behind
:mod:`longpo_megatron.schedule.engine` / :mod:`longpo_megatron.schedule.megatron_engine`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from longpo_megatron import distributed
from longpo_megatron.config import Config
from longpo_megatron.config_validation import ResolvedLayout
from longpo_megatron.context_parallel import split_batch
from longpo_megatron.data.collate import collate_pairs
from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.sampler import PairSampler, slice_for_dp
from longpo_megatron.data.tokenizer import build_tokenizer
from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
from longpo_megatron.metrics import MetricsLogger, reduce_step_metrics
from longpo_megatron.model.gpt import ModelLayout, build_model
from longpo_megatron.optim import lr_at
from longpo_megatron.reference import score_reference
from longpo_megatron.schedule.engine import CpuEngine
from longpo_megatron.schedule.forward_step import Batch, make_train_forward_step


@dataclass
class TrainState:
    """Everything that defines where training is (saved with every checkpoint)."""

    step: int = 0
    """Optimizer steps taken."""
    consumed_pairs: int = 0
    """Pairs consumed across all DP ranks."""
    sampler: dict[str, Any] = field(default_factory=dict)
    """Data-order position (:meth:`PairSampler.state_dict`)."""


def model_layout(layout: ResolvedLayout) -> ModelLayout:
    """The part of the resolved layout the model builder needs."""
    return ModelLayout(
        tp=layout.tp,
        pp=layout.pp,
        cp=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        attention_backend=layout.attention_backend,
        engine=layout.engine,
        precision=layout.precision,
    )


class Trainer:
    """Owns the groups, data, model, engine and logger of one run."""

    def __init__(self, cfg: Config, layout: ResolvedLayout) -> None:
        self.cfg = cfg
        self.layout = layout
        self.state = TrainState()
        self.history: list[dict[str, float]] = []

    def setup(self) -> Trainer:
        """Start distributed, load data, build the model, score the reference, build the engine."""
        cfg, layout = self.cfg, self.layout
        backend = cfg.parallel.distributed_backend or ("nccl" if layout.engine == "gpu" else "gloo")
        distributed.init_process_group(backend, cfg.parallel.timeout_minutes)
        self.groups = g = distributed.init_model_parallel(layout.tp, layout.pp, layout.cp)
        distributed.seed_all(cfg.train.seed, g, cuda=layout.engine == "gpu")
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"data.tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}: the tokenizer does not match the model"
            )
        self.dataset, self.report = load_dataset(cfg.data, self.tokenizer)
        self.mlayout = model_layout(layout)
        self.model = build_model(cfg.model, self.mlayout, g)
        self.device = next(self.model.parameters()).device
        score_reference(
            self.model,
            cfg,
            self.mlayout,
            g,
            self.dataset,
            self.tokenizer.pad_id,
            layout.seq_multiple,
        )
        self.engine = self._build_engine()
        self.sampler = PairSampler(len(self.dataset), cfg.train.seed, cfg.data.shuffle)
        loss_groups = LossGroups(g.tp, g.cp, layout.sequence_parallel)
        self.forward_step = make_train_forward_step(LongPOLossLayer(cfg.longpo, loss_groups))
        run_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.logger = MetricsLogger(cfg.logging, g.is_logging_rank, run_cfg)
        if g.is_logging_rank:
            print(f"data: {len(self.dataset)} pairs; {self.report.summary()}", flush=True)
        return self

    def _build_engine(self):
        if self.layout.engine == "gpu":
            from longpo_megatron.schedule.megatron_engine import MegatronEngine

            return MegatronEngine(
                self.model, self.groups, self.cfg.optim, self.cfg.train.micro_batch_size
            )
        return CpuEngine(self.model, self.groups, self.cfg.optim)

    def micro_batches(self, indices: list[int]) -> list[Batch]:
        """This DP rank's micro-batches of one global batch (pairs never split)."""
        mine = slice_for_dp(indices, self.groups.dp_rank, self.groups.dp_size)
        mbs = self.cfg.train.micro_batch_size
        out = []
        for lo in range(0, len(mine), mbs):
            chunk = mine[lo : lo + mbs]
            batch = collate_pairs(
                [self.dataset[i] for i in chunk],
                self.tokenizer.pad_id,
                self.layout.seq_multiple,
                self.dataset.ref_logps_for(chunk),
            )
            batch["num_tokens"] = batch["real_mask"].sum() + batch["tokens"].shape[0]
            batch = split_batch(batch, self.groups.cp_rank, self.groups.cp_size)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def train_step(self) -> Optional[dict[str, float]]:
        """One optimizer step; returns the step's metrics on the last stage (None elsewhere)."""
        cfg = self.cfg
        indices = self.sampler.next_global_batch(cfg.train.global_batch_size)
        batches = self.micro_batches(indices)
        lr = lr_at(self.state.step, cfg.optim, cfg.train.train_iters)
        t0 = time.perf_counter()
        result = self.engine.train_step(self.forward_step, batches, lr)
        elapsed = time.perf_counter() - t0
        self.state.step += 1
        self.state.consumed_pairs += len(indices)
        self.state.sampler = self.sampler.state_dict()
        values = reduce_step_metrics(result.metrics, self.groups.dp)
        if values is None:
            return None
        tokens = sum(float(b["num_tokens"]) for b in batches)
        values |= {
            "lr": lr,
            "grad_norm": result.grad_norm,
            "skipped": float(result.skipped),
            "tokens_per_s": tokens * self.groups.dp_size / max(elapsed, 1e-9),
            "step_time_s": elapsed,
        }
        return values

    def run(self) -> list[dict[str, float]]:
        """Train ``train.train_iters`` steps; returns the last stage's per-step metrics."""
        while self.state.step < self.cfg.train.train_iters:
            values = self.train_step()
            if values is None:
                continue
            self.history.append(values)
            if self.state.step % self.cfg.train.log_interval == 0:
                self.logger.log(self.state.step, values)
        return self.history

    def close(self) -> None:
        """Flush logs and tear down process groups."""
        if hasattr(self, "logger"):
            self.logger.close()
        distributed.destroy()


def state_as_dict(state: TrainState) -> dict[str, Any]:
    """Plain-dict form of the train state (checkpoint payload)."""
    return dataclasses.asdict(state)
