"""The training loop: build every stage from the config, then step, log and close.

Everything here is engine-agnostic; the CPU/GPU differences live behind
:mod:`longpo_megatron.schedule.engine` / :mod:`longpo_megatron.schedule.megatron_engine`.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from longpo_megatron import checkpoint, distributed
from longpo_megatron.config import Config
from longpo_megatron.config_validation import ConfigError, ResolvedLayout, check_dataset_size
from longpo_megatron.context_parallel import split_batch
from longpo_megatron.data.collate import (
    collate_pairs,
    collate_shared_prefix,
    place_chosen_token_values,
)
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.preprocess import prepared_for_run
from longpo_megatron.data.sampler import PairSampler, slice_for_dp
from longpo_megatron.data.tokenizer import build_tokenizer
from longpo_megatron.errors import REQUEUE_EXIT_CODE
from longpo_megatron.flops import Dims, mfu, peak_flops_of, step_flops
from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
from longpo_megatron.metrics import MetricsLogger, RunLog, reduce_step_metrics
from longpo_megatron.model.gpt import ModelLayout, build_model
from longpo_megatron.numerics import NonFiniteGuard, refuse_nonfinite_save
from longpo_megatron.optim import lr_at
from longpo_megatron.preemption import (
    PreemptionHandler,
    SaveClock,
    StopRequested,
    TimeLimit,
    step_delay_s,
)
from longpo_megatron.reference import beside, build_scorer, score_reference, view_of
from longpo_megatron.schedule.engine import CpuEngine
from longpo_megatron.schedule.forward_step import Batch, make_train_forward_step
from longpo_megatron.step_stats import BatchStats, global_batch_stats
from longpo_megatron.validation import CHECKPOINT_KEY, Validator, held_out


@dataclass
class TrainState:
    """Everything that defines where training is (saved with every checkpoint)."""

    step: int = 0
    """Optimizer steps taken."""
    consumed_pairs: int = 0
    """Pairs consumed across all DP ranks."""
    sampler: dict[str, Any] = field(default_factory=dict)
    """Data-order position (:meth:`PairSampler.state_dict`)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The data trained on (:func:`~longpo_megatron.reference.beside.data_identity`): source
    sha256, prepared identity, records, and the reference table's row keys (id:fingerprint)."""
    consumed_tokens: int = 0
    """Real tokens (chosen + rejected rows) consumed across all DP ranks."""
    wandb_run_id: str = ""
    """The W&B run this training logs to (a requeued job resumes it); empty without W&B."""


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

    def __init__(
        self, cfg: Config, layout: ResolvedLayout, preemption: Optional[PreemptionHandler] = None
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.state = TrainState()
        self.history: list[dict[str, float]] = []
        self.preempted = False
        """True when :meth:`run` stopped early (SIGTERM / SIGUSR1 or the time limit)."""
        self.exit_code = 0
        """Process exit status: REQUEUE_EXIT_CODE after a time-limit stop, else 0."""
        self._saved_step: Optional[int] = None
        self.preemption = preemption if preemption is not None else PreemptionHandler().install()
        train, ck = cfg.train, cfg.checkpoint
        self.time_limit = TimeLimit.from_config(
            train.exit_duration_minutes, train.exit_margin_minutes, self.preemption.started_at
        )
        self.save_clock = SaveClock(ck.save_interval_minutes)
        self.async_writer = None
        if ck.async_save and ck.save:
            self.async_writer = checkpoint.AsyncCheckpointWriter(gpu=layout.engine == "gpu")
        self._step_delay = step_delay_s()
        self.validator: Optional[Validator] = None
        self._resumed_common: dict[str, Any] = {}
        """Common state of the checkpoint resumed from (extra keys such as validation's)."""
        self._pending_metrics: dict[str, float] = {}
        """Metrics produced between logged steps (checkpoint timings), logged with the next."""
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)

    def setup(self) -> Trainer:
        """Start distributed, load data, build the model, score the reference, build the engine."""
        cfg, layout = self.cfg, self.layout
        backend = cfg.parallel.distributed_backend or ("nccl" if layout.engine == "gpu" else "gloo")
        distributed.init_process_group(backend, cfg.parallel.timeout_minutes)
        self.groups = g = distributed.init_model_parallel(layout.tp, layout.pp, layout.cp)
        self.run_log = RunLog(cfg.logging.output_dir) if g.is_logging_rank else None
        distributed.seed_all(cfg.train.seed, g, cuda=layout.engine == "gpu")
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"data.tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}: the tokenizer does not match the model"
            )
        self.dataset = prepared_for_run(cfg.data, self.tokenizer)
        self.report = self.dataset.report()
        self._stop_if_requested("loading the data")
        self.dataset, held = held_out(cfg.data, self.tokenizer, self.dataset, cfg.train.seed)
        self.state.data = beside.data_identity(self.dataset, cfg)
        check_dataset_size(len(self.dataset), cfg)
        self.mlayout = model_layout(layout, cfg.parallel.cp_comm_type)
        self.model = build_model(cfg.model, self.mlayout, g)
        self.device = next(self.model.parameters()).device
        self.engine = self._build_engine()
        self.sampler = PairSampler(len(self.dataset), cfg.train.seed, cfg.data.shuffle)
        self._resume_or_score_reference()
        self.validator = self._build_validator(held)
        self._stop_if_requested("building the model and scoring the reference")
        loss_groups = LossGroups(g.tp, g.cp, layout.sequence_parallel)
        self.forward_step = make_train_forward_step(LongPOLossLayer(cfg.longpo, loss_groups))
        self.run_cfg = run_cfg = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.logger = MetricsLogger(
            cfg.logging, g.is_logging_rank, run_cfg, self.state.step, self._wandb_run_id()
        )
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
        elif self.dataset.has_ref_logps:
            pass
        elif self._scores_beside_data():
            self.state.data["reference_identity"] = beside.score_or_load(
                lambda: build_scorer(cfg, self.mlayout, g, self.tokenizer.pad_id, self.model),
                cfg,
                self.dataset,
                4 * g.dp_size,
            )
        else:
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
        ts, data = ck.train_state, self.state.data
        allow = self.cfg.data.allow_changed_data_on_resume
        beside.check_data(ck.path, ts.get("data"), data, allow)
        ref_identity = (ts.get("data") or {}).get("reference_identity")
        if ref_identity:  # the initial reference's identity, not this (resumed) run's
            data["reference_identity"] = ref_identity
        self.state = TrainState(
            step=int(ts.get("step", 0)),
            consumed_pairs=int(ts.get("consumed_pairs", 0)),
            sampler=dict(ts.get("sampler") or {}),
            data=data,
            consumed_tokens=int(ts.get("consumed_tokens", 0)),
            wandb_run_id=str(ts.get("wandb_run_id") or ""),
        )
        try:
            if self.state.sampler:
                self.sampler.load_state_dict(self.state.sampler)
            if ck.reference_table is not None:
                keys = (ts.get("data") or {}).get("reference_keys")
                view = view_of(self.cfg.longpo.loss)
                missing = beside.restore_table(self.dataset, ck.reference_table, keys, view)
                if missing and self.cfg.reference.mode == "initial_policy":
                    self._reference_from_store(ck.path, missing, ref_identity)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"{ck.path}: does not match this run: {e}") from None
        self._saved_step = self.state.step
        self._resumed_common = ck.common
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

    def _scores_beside_data(self) -> bool:
        """initial_policy sums are stored beside prepared data (not for sft_kl's per-token
        values, nor for a held-out split's view, which has no directory of its own)."""
        cfg = self.cfg
        return (
            cfg.reference.mode == "initial_policy"
            and cfg.longpo.loss != "sft_kl"
            and getattr(self.dataset, "root", None) is not None
        )

    def _reference_from_store(self, ckpt: Path, missing: list[int], identity) -> None:
        """Pairs the checkpoint has no scores for: the initial reference's stored scores beside
        the data, or stop (the resumed weights are no longer the initial policy's)."""
        if beside.load_beside(self.cfg, self.dataset, identity) is None:
            ids = [self.dataset.record_id(i) for i in missing[:3]]
            raise checkpoint.CheckpointError(
                f"{ckpt}: {len(missing)} records of this data have no reference scores in the "
                f"checkpoint (e.g. {ids}) and the initial reference's scores are not stored "
                f"beside it in {getattr(self.dataset, 'root', '(a split)')}/reference; the "
                "initial weights are needed to "
                "score them (reference.load, or reference=precomputed)"
            )

    def save_checkpoint(self, blocking: bool = True) -> Path:
        """Save the whole training state under ``checkpoint.save`` (collective); returns its dir.

        With ``checkpoint.async_save`` the shards are written in the background; ``blocking``
        then waits until they are written and published (stop and end of training).
        """
        ck = self.cfg.checkpoint
        if not ck.save:
            raise ValueError("checkpoint.save is not set")
        self._finish_async_save(blocking=True)
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
            async_writer=self.async_writer,
            extra=self.validator.checkpoint_extra() if self.validator else None,
            checksums=ck.checksums,
        )
        blocked = time.perf_counter() - t0
        self._saved_step = self.state.step
        self.save_clock.saved()
        self._pending_metrics["checkpoint/blocking_s"] = blocked
        if self.async_writer is None:
            self.time_limit.record_save(blocked)
            if self.groups.is_logging_rank:
                print(f"saved checkpoint {path} ({blocked:.2f} s)", flush=True)
            return path
        if self.groups.is_logging_rank:
            print(
                f"checkpoint {path}: training blocked {blocked:.2f} s; writing in the background",
                flush=True,
            )
        if blocking:
            self._finish_async_save(blocking=True)
        return path

    def _finish_async_save(self, blocking: bool) -> None:
        """Publish the background save once every rank wrote it (collective; every boundary)."""
        if self.async_writer is None:
            return
        done = self.async_writer.poll(blocking)
        if done is None:
            return
        self.time_limit.record_save(done.seconds)
        self._pending_metrics["checkpoint/save_s"] = done.seconds
        if self.groups.is_logging_rank:
            print(f"saved checkpoint {done.path} (async, {done.seconds:.2f} s)", flush=True)

    def _step_boundary(self) -> bool:
        """Save on the step / minute interval, on a signal or before the time limit; True when
        the run must stop (every rank agrees: one all-reduce)."""
        ck = self.cfg.checkpoint
        self._finish_async_save(blocking=False)
        more = self.state.step < self.cfg.train.train_iters
        decision = self.preemption.poll(
            time_limit=more and self.time_limit.should_stop(), save_due=self.save_clock.due()
        )
        stop = decision.stop
        every = ck.save_interval
        due = decision.save_due or (every > 0 and self.state.step % every == 0)
        path = self.save_checkpoint(blocking=stop) if ck.save and (stop or due) else None
        if not stop:
            return False
        self.preempted = True
        done = f"saved checkpoint {path}" if path else "no checkpoint.save: nothing saved"
        if decision.signal:
            why = f"preempted ({self.preemption.signal_name})"
        else:
            self.exit_code = REQUEUE_EXIT_CODE if path else 0
            why = (
                f"time limit: {self.time_limit.remaining_s():.0f} s left, one more step + save "
                f"+ margin need {self.time_limit.needed_s:.0f} s; stopping"
            )
        if self.groups.is_logging_rank:
            print(
                f"{why} at step {self.state.step}: {done}; exiting (code {self.exit_code})",
                flush=True,
            )
        return True

    def _validate(self) -> dict[str, float]:
        """``valid/*`` metrics when validation is due at this step (collective), else empty."""
        if self.validator is None or not self.validator.due(self.state.step):
            return {}
        return self.validator.run() or {}

    def _build_validator(self, dataset: Optional[PreferenceDataset]) -> Optional[Validator]:
        """The held-out validation of ``data.validation_*`` with its reference scores ready."""
        if dataset is None:
            return None
        validator = Validator(self, dataset)
        saved = self._resumed_common.get(CHECKPOINT_KEY)
        validator.prepare(saved)
        if self.groups.is_logging_rank:
            print(f"validation: {len(dataset)} held-out pairs", flush=True)
        return validator

    def _stop_if_requested(self, phase: str) -> None:
        """A signal during setup stops the run before training (collective): nothing new to
        save, the job resumes later from its last checkpoint."""
        if not self.preemption.requested():
            return
        self.preempted = True
        if self.groups.is_logging_rank:
            print(
                f"preempted ({self.preemption.signal_name}) while {phase}: stopping before "
                "training, nothing saved; exiting (code 0)",
                flush=True,
            )
        raise StopRequested(phase)

    def _wandb_run_id(self) -> Optional[str]:
        """The W&B run id (from the checkpoint, else a new one rank 0 draws); None without W&B."""
        if not self.cfg.logging.wandb_project:
            return None
        if not self.state.wandb_run_id:
            drawn = [secrets.token_hex(4)]
            dist.broadcast_object_list(drawn, src=0)
            self.state.wandb_run_id = drawn[0]
        return self.state.wandb_run_id

    def micro_batches(self, indices: list[int]) -> list[Batch]:
        """This DP rank's micro-batches of one global batch (pairs never split)."""
        mine = slice_for_dp(indices, self.groups.dp_rank, self.groups.dp_size)
        return self.collate_micro_batches(mine, self.dataset)

    def collate_micro_batches(self, mine: list[int], dataset: PreferenceDataset) -> list[Batch]:
        """Micro-batches of ``dataset``'s pairs ``mine`` (this DP rank's), split over CP."""
        mbs = self.cfg.train.micro_batch_size
        out = []
        for lo in range(0, len(mine), mbs):
            chunk = mine[lo : lo + mbs]
            collate = collate_shared_prefix if self.cfg.data.shared_prefix else collate_pairs
            batch = collate(
                [dataset[i] for i in chunk],
                self.tokenizer.pad_id,
                self.layout.seq_multiple,
                dataset.ref_logps_for(chunk),
            )
            if self.cfg.longpo.loss == "sft_kl":
                tokens = [dataset.ref_token_logps(i) for i in chunk]
                batch = place_chosen_token_values(batch, tokens)
            batch["num_tokens"] = batch["real_mask"].sum() + batch["tokens"].shape[0]
            batch = split_batch(batch, self.groups.cp_rank, self.groups.cp_size)
            out.append({k: v.to(self.device) for k, v in batch.items()})
        return out

    def train_step(self) -> Optional[dict[str, float]]:
        """One optimizer step; returns the step's metrics on the last stage (None elsewhere)."""
        cfg = self.cfg
        indices = self.sampler.next_global_batch(cfg.train.global_batch_size)
        stats = self._batch_stats(indices)
        if self.online_reference is not None:
            self.online_reference.fill(self.dataset, indices)
        batches = self.micro_batches(indices)
        lr = lr_at(self.state.step, cfg.optim, cfg.train.train_iters)
        t0 = time.perf_counter()
        result = self.engine.train_step(self.forward_step, batches, lr)
        elapsed = time.perf_counter() - t0
        if self._step_delay:
            time.sleep(self._step_delay)  # test aid only (preemption.STEP_DELAY_ENV)
        self.nonfinite.update(self.state.step + 1, result.skipped, result.grad_norm)
        self.state.step += 1
        self.state.consumed_pairs += len(indices)
        self.state.consumed_tokens += stats.tokens
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
        return values | self._throughput(stats, elapsed)

    def _batch_stats(self, indices: list[int]) -> BatchStats:
        """Tokens, padding, lengths and model FLOPs of the global batch (same on every rank)."""
        cfg = self.cfg
        online = cfg.reference.mode == "online"
        return global_batch_stats(
            self.dataset,
            indices,
            Dims.of(cfg.model),
            dp_size=self.groups.dp_size,
            micro_batch_size=cfg.train.micro_batch_size,
            seq_multiple=self.layout.seq_multiple,
            nll_scope=cfg.longpo.nll_scope,
            reference_view=view_of(cfg.longpo.loss) if online else None,
            shared_prefix=cfg.data.shared_prefix,
        )

    def _throughput(self, stats: BatchStats, seconds: float) -> dict[str, float]:
        """Model TFLOP/s and MFU per GPU (flops.py formula), batch statistics, peak memory."""
        flops = step_flops(stats.policy_forward_flops, stats.reference_forward_flops)
        gpus = self.layout.world_size
        out = stats.metrics() | {"tflops_per_gpu": flops / max(seconds, 1e-9) / gpus / 1e12}
        peak = self.cfg.logging.peak_tflops
        peak_flops = peak * 1e12 if peak else None
        if self.device.type == "cuda":
            peak_flops = peak_flops or peak_flops_of(torch.cuda.get_device_name(self.device))
            out["mem/peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["mem/peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if peak_flops:
            out["mfu"] = mfu(flops, seconds, gpus, peak_flops)
        return out

    def _progress(self, step_started: float) -> dict[str, float]:
        """Consumed pairs/tokens, ETA from the recent step times, checkpoint timings."""
        recent = [*self.time_limit.steps, time.perf_counter() - step_started]
        left = self.cfg.train.train_iters - self.state.step
        out = {
            "consumed_pairs": float(self.state.consumed_pairs),
            "consumed_tokens": float(self.state.consumed_tokens),
            "eta_s": left * sum(recent) / len(recent),
        }
        out |= self._pending_metrics
        self._pending_metrics = {}
        return out

    def run(self) -> list[dict[str, float]]:
        """Train ``train.train_iters`` steps; returns the last stage's per-step metrics."""
        while self.state.step < self.cfg.train.train_iters:
            t0 = time.perf_counter()
            values = self.train_step()
            valid = self._validate()
            if values is not None:
                values |= self._progress(t0) | valid
                self.history.append(values)
                if self.state.step % self.cfg.train.log_interval == 0:
                    self.logger.log(self.state.step, values)
            self.time_limit.record_step(time.perf_counter() - t0)
            if self.cfg.train.eval_interval and self.state.step % self.cfg.train.eval_interval == 0:
                self.run_probe()
            if self._step_boundary():
                return self.history
        if self.cfg.checkpoint.save and self._saved_step != self.state.step:
            self.save_checkpoint()
        self._finish_async_save(blocking=True)
        return self.history

    def run_probe(self) -> dict[str, float]:
        """The needle probe of ``train.eval_interval`` on the policy (collective); logs it."""
        from longpo_megatron.eval.probe import NeedleProbe

        if getattr(self, "_probe", None) is None:
            self._probe = NeedleProbe.for_trainer(self)
        values = self._probe.run(self.model)
        self.logger.log(self.state.step, values)
        return values

    def close(self) -> None:
        """Flush logs and tear down process groups."""
        if hasattr(self, "logger"):
            self.logger.close()
        if getattr(self, "run_log", None) is not None:
            self.run_log.close()
            self.run_log = None
        if hasattr(self, "preemption"):
            self.preemption.uninstall()
        distributed.destroy()


def state_as_dict(state: TrainState) -> dict[str, Any]:
    """Plain-dict form of the train state (checkpoint payload)."""
    return dataclasses.asdict(state)
