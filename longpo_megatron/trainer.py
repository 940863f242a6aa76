"""The training loop: build every stage from the config, then step, log and close.

Everything here is engine-agnostic; the CPU/GPU differences live behind
:mod:`longpo_megatron.schedule.engine` / :mod:`longpo_megatron.schedule.megatron_engine`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from longpo_megatron import checkpoint, distributed
from longpo_megatron.config import Config
from longpo_megatron.config_validation import ConfigError, ResolvedLayout, check_dataset_size
from longpo_megatron.context_parallel import split_batch
from longpo_megatron.data.collate import collate_pairs, place_chosen_token_values
from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.sampler import PairSampler, slice_for_dp
from longpo_megatron.data.tokenizer import build_tokenizer
from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
from longpo_megatron.metrics import MetricsLogger, reduce_step_metrics
from longpo_megatron.model.gpt import ModelLayout, build_model
from longpo_megatron.numerics import NonFiniteGuard, refuse_nonfinite_save
from longpo_megatron.optim import lr_at
from longpo_megatron.preemption import PreemptionHandler
from longpo_megatron.reference import build_scorer, score_reference
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


def model_layout(layout: ResolvedLayout, cp_comm_type: str = "p2p") -> ModelLayout:
    """The part of the resolved layout the model builder needs."""
    return ModelLayout(
        cp_comm_type=cp_comm_type,
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
        self.preempted = False
        """True when :meth:`run` stopped early on SIGTERM / SIGUSR1."""
        self._saved_step: Optional[int] = None
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)

    def setup(self) -> Trainer:
        """Start distributed, load data, build the model, score the reference, build the engine."""
        cfg, layout = self.cfg, self.layout
        backend = cfg.parallel.distributed_backend or ("nccl" if layout.engine == "gpu" else "gloo")
        distributed.init_process_group(backend, cfg.parallel.timeout_minutes)
        self.groups = g = distributed.init_model_parallel(layout.tp, layout.pp, layout.cp)
        distributed.seed_all(cfg.train.seed, g, cuda=layout.engine == "gpu")
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}: the tokenizer does not match the model"
            )
        self.dataset, self.report = load_dataset(cfg.data, self.tokenizer)
        check_dataset_size(len(self.dataset), cfg)
        self.mlayout = model_layout(layout, cfg.parallel.cp_comm_type)
        self.model = build_model(cfg.model, self.mlayout, g)
        self.device = next(self.model.parameters()).device
        self.engine = self._build_engine()
        self.sampler = PairSampler(len(self.dataset), cfg.train.seed, cfg.data.shuffle)
        self._resume_or_score_reference()
        loss_groups = LossGroups(g.tp, g.cp, layout.sequence_parallel)
        self.forward_step = make_train_forward_step(LongPOLossLayer(cfg.longpo, loss_groups))
        self.run_cfg = run_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.logger = MetricsLogger(cfg.logging, g.is_logging_rank, run_cfg)
        self.preemption = PreemptionHandler().install()
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

    def _resume_or_score_reference(self) -> None:
        """Resume from ``checkpoint.load`` when set; score the reference unless it was restored.

        A training checkpoint carries the initial policy's reference scores; a weights checkpoint
        (or a fresh start) is scored here from the model's current (= initial) weights.
        """
        cfg, g = self.cfg, self.groups
        if cfg.checkpoint.load:
            loaded = checkpoint.load(
                cfg.checkpoint.load, self.model, g, optimizer=self.engine.optimizer,
                verify=cfg.checkpoint.checksums,
            )  # fmt: skip
            self._apply_checkpoint(loaded)
        self.online_reference = None
        if cfg.reference.mode == "online":
            self.online_reference = self._online_reference()
        elif not self.dataset.has_ref_logps:
            score_reference(
                self.model,
                cfg,
                self.mlayout,
                g,
                self.dataset,
                self.tokenizer.pad_id,
            )

    def _online_reference(self):
        """The frozen reference of ``reference.mode=online`` (initial weights, never the
        resumed policy's)."""
        cfg, resumed = self.cfg, self.state.step > 0
        if resumed and not cfg.reference.load:
            raise ConfigError(
                "reference.mode=online resumed at step "
                f"{self.state.step} needs reference.load (the initial weights): the policy's "
                "weights are no longer the initial ones"
            )
        policy = None if resumed else self.model
        return build_scorer(cfg, self.mlayout, self.groups, self.tokenizer.pad_id, policy)

    def _apply_checkpoint(self, ck: checkpoint.LoadedCheckpoint) -> None:
        """Take step, consumed pairs, data position and reference scores from ``ck``."""
        ts = ck.train_state
        self.state = TrainState(
            step=int(ts.get("step", 0)),
            consumed_pairs=int(ts.get("consumed_pairs", 0)),
            sampler=dict(ts.get("sampler") or {}),
        )
        try:
            if self.state.sampler:
                self.sampler.load_state_dict(self.state.sampler)
            if ck.reference_table is not None:
                self.dataset.load_ref_state(ck.reference_table)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"{ck.path}: does not match this run: {e}") from None
        self._saved_step = self.state.step
        if self.groups.is_logging_rank:
            if ck.kind == "training":
                now = OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)
                for diff in checkpoint.config_differences(ck.config, now)[:20]:
                    print(f"warning: config differs from the checkpoint's: {diff}", flush=True)
            print(
                f"resumed from {ck.path} ({ck.kind} checkpoint): step {self.state.step}, "
                f"optimizer {'restored' if ck.optimizer_restored else 'fresh'}, "
                f"RNG {'restored' if ck.rng_restored else 'from the seed'}",
                flush=True,
            )

    def save_checkpoint(self) -> Path:
        """Save the whole training state under ``checkpoint.save`` (collective); returns its dir."""
        ck = self.cfg.checkpoint
        if not ck.save:
            raise ValueError("checkpoint.save is not set")
        refuse_nonfinite_save(self.model.parameters(), self.state.step)
        t0 = time.perf_counter()
        path = checkpoint.save(
            ck.save,
            self.state.step,
            self.model,
            self.groups,
            optimizer=self.engine.optimizer,
            train_state=state_as_dict(self.state),
            reference_table=self.dataset.ref_state(),
            config=self.run_cfg,
            keep_last=ck.keep_last,
            checksums=ck.checksums,
        )
        self._saved_step = self.state.step
        if self.groups.is_logging_rank:
            print(f"saved checkpoint {path} ({time.perf_counter() - t0:.2f} s)", flush=True)
        return path

    def _step_boundary(self) -> bool:
        """Save on the interval or on preemption; True when the run must stop (preempted)."""
        ck = self.cfg.checkpoint
        stop = self.preemption.requested()
        due = ck.save_interval > 0 and self.state.step % ck.save_interval == 0
        path = self.save_checkpoint() if ck.save and (stop or due) else None
        if stop:
            self.preempted = True
            if self.groups.is_logging_rank:
                done = f"saved checkpoint {path}" if path else "no checkpoint.save: nothing saved"
                print(
                    f"preempted ({self.preemption.signal_name}) at step {self.state.step}: "
                    f"{done}; exiting",
                    flush=True,
                )
        return stop

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
            if self.cfg.longpo.loss == "sft_kl":
                tokens = [self.dataset.ref_token_logps(i) for i in chunk]
                batch = place_chosen_token_values(batch, tokens)
            batch["num_tokens"] = batch["real_mask"].sum() + batch["tokens"].shape[0]
            batch = split_batch(batch, self.groups.cp_rank, self.groups.cp_size)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def train_step(self) -> Optional[dict[str, float]]:
        """One optimizer step; returns the step's metrics on the last stage (None elsewhere)."""
        cfg = self.cfg
        indices = self.sampler.next_global_batch(cfg.train.global_batch_size)
        if self.online_reference is not None:
            self.online_reference.fill(self.dataset, indices)
        batches = self.micro_batches(indices)
        lr = lr_at(self.state.step, cfg.optim, cfg.train.train_iters)
        t0 = time.perf_counter()
        result = self.engine.train_step(self.forward_step, batches, lr)
        elapsed = time.perf_counter() - t0
        self.nonfinite.update(self.state.step + 1, result.skipped, result.grad_norm)
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
            if values is not None:
                self.history.append(values)
                if self.state.step % self.cfg.train.log_interval == 0:
                    self.logger.log(self.state.step, values)
            if self._step_boundary():
                return self.history
        if self.cfg.checkpoint.save and self._saved_step != self.state.step:
            self.save_checkpoint()
        return self.history

    def close(self) -> None:
        """Flush logs and tear down process groups."""
        if hasattr(self, "logger"):
            self.logger.close()
        if hasattr(self, "preemption"):
            self.preemption.uninstall()
        distributed.destroy()


def state_as_dict(state: TrainState) -> dict[str, Any]:
    """Plain-dict form of the train state (checkpoint payload)."""
    return dataclasses.asdict(state)
