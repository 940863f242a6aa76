"""Held-out validation: preference accuracy, margins and NLL on pairs the optimizer never sees.

The held-out set comes from ``data.validation_path`` (loaded like the training data, through
:func:`~longpo_megatron.data.preprocess.prepared_for_run`) or is split off ``data.path`` by
``data.validation_fraction`` (seeded by ``train.seed``, so every restart splits the same way).
Its reference scores come from the same reference as training: scored once at start from the
initial weights (``reference.mode=initial_policy``; saved in every checkpoint so a resumed run
keeps them), or per validation from the frozen model (``online``). The forward runs through the
engine's forward-only schedule with the training forward step and loss layer, so the metrics
are the training metrics (``valid/loss``, ``valid/nll``, ``valid/rewards/accuracy``,
``valid/rewards/margins``...), averaged over every held-out pair.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from longpo_megatron.checkpoint import CheckpointError
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.preprocess import prepared_for_run
from longpo_megatron.loss.layer import METRIC_KEYS
from longpo_megatron.reference import build_scorer

if TYPE_CHECKING:
    from longpo_megatron.trainer import Trainer

CHECKPOINT_KEY = "validation_reference_table"
"""Common-state key (checkpoint ``extra``) of the held-out pairs' reference scores."""


class SubsetDataset(PreferenceDataset):
    """A lazy view of some pairs of a dataset, re-indexed 0..n-1 (nothing is copied: a prepared
    dataset stays memory-mapped). Its ``meta`` names the split, so a checkpoint's data identity
    changes with it; it has no ``root``, so its reference scores are kept in memory and in the
    checkpoint, never stored beside the full dataset's."""

    def __init__(self, base: PreferenceDataset, indices: list[int], split: str) -> None:
        self.base, self.indices = base, list(indices)
        self.pairs = None
        self.records = None
        base_meta = dict(getattr(base, "meta", None) or {})
        if base_meta:
            base_meta["identity"] = f"{base_meta.get('identity')}/{split}"
        self.meta = base_meta or None
        self._ref = torch.full((len(self.indices), 2), math.nan, dtype=torch.float64)
        self._ref_tokens: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return dataclasses.replace(self.base[self.indices[index]], index=index)

    def record_id(self, index: int) -> str:
        return self.base.record_id(self.indices[index])

    def pair_fingerprint(self, index: int, view: str) -> str:
        return self.base.pair_fingerprint(self.indices[index], view)

    def report(self):
        return self.base.report()


def split_validation(
    dataset: PreferenceDataset, fraction: float, seed: int
) -> tuple[PreferenceDataset, PreferenceDataset]:
    """(training, held-out): ``ceil(fraction * N)`` seeded-random pairs held out."""
    n = len(dataset)
    held = math.ceil(fraction * n)
    if not 0 < held < n:
        raise ValueError(
            f"data.validation_fraction={fraction}: holds out {held} of {n} pairs; at least one "
            "pair must remain on each side"
        )
    order = np.random.default_rng(seed).permutation(n)
    valid = sorted(int(i) for i in order[:held])
    train = sorted(int(i) for i in order[held:])
    split = f"split:{fraction}:{seed}"
    return SubsetDataset(dataset, train, split + ":train"), SubsetDataset(
        dataset, valid, split + ":valid"
    )


def held_out(
    data_cfg: Any, tokenizer: Any, dataset: PreferenceDataset, seed: int
) -> tuple[PreferenceDataset, Optional[PreferenceDataset]]:
    """(training dataset, validation dataset or None) for ``data.validation_*``."""
    if data_cfg.validation_path:
        valid_cfg = dataclasses.replace(data_cfg, path=data_cfg.validation_path)
        return dataset, prepared_for_run(valid_cfg, tokenizer)
    if data_cfg.validation_fraction > 0:
        return split_validation(dataset, data_cfg.validation_fraction, seed)
    return dataset, None


class Validator:
    """Scores the held-out set every ``train.valid_interval`` steps and at the end."""

    def __init__(self, trainer: Trainer, dataset: PreferenceDataset) -> None:
        self.trainer = trainer
        self.dataset = dataset

    def prepare(self, saved_table: Optional[torch.Tensor]) -> None:
        """Reference scores of the held-out pairs: from the checkpoint, else the initial weights
        (the policy before its first step, or ``reference.load``). Online mode scores later."""
        t = self.trainer
        cfg = t.cfg
        if cfg.reference.mode == "online":
            return
        if saved_table is not None:
            self.dataset.load_ref_state(saved_table)
            return
        if t.state.step > 0 and not cfg.reference.load:
            raise CheckpointError(
                f"resumed at step {t.state.step} without held-out reference scores in the "
                "checkpoint: the policy is no longer the initial model; set reference.load (the "
                "initial weights) to score the validation pairs"
            )
        policy = None if t.state.step > 0 else t.model
        scorer = build_scorer(cfg, t.mlayout, t.groups, t.tokenizer.pad_id, policy)
        n, g = len(self.dataset), t.groups
        chunk = cfg.reference.micro_batch_size * g.dp_size * g.cp_size
        with tqdm(total=n, desc="held-out reference scores", unit="pair",
                  disable=not g.is_logging_rank) as bar:  # fmt: skip
            for lo in range(0, n, chunk):
                scorer.fill(self.dataset, range(lo, min(n, lo + chunk)))
                bar.update(min(n, lo + chunk) - lo)

    def due(self, step: int) -> bool:
        """Every ``train.valid_interval`` steps and at the last step."""
        train = self.trainer.cfg.train
        every = train.valid_interval
        return step == train.train_iters or (every > 0 and step % every == 0)

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume validation (reference scores, when fixed)."""
        if self.trainer.cfg.reference.mode == "online":
            return {}
        return {CHECKPOINT_KEY: self.dataset.ref_state()}

    def run(self) -> Optional[dict[str, float]]:
        """``valid/*`` means over every held-out pair (last stage; None elsewhere). Collective."""
        t = self.trainer
        g = t.groups
        everything = list(range(len(self.dataset)))
        if t.online_reference is not None:
            t.online_reference.fill(self.dataset, everything)
        mine = everything[g.dp_rank :: g.dp_size]
        per_call = t.cfg.train.micro_batch_size * t.layout.grad_accum
        metrics: list[dict[str, torch.Tensor]] = []
        for lo in range(0, len(mine), per_call):
            batches = t.collate_micro_batches(mine[lo : lo + per_call], self.dataset)
            metrics += t.engine.evaluate(t.forward_step, batches)
        if not g.is_last_stage:
            return None
        keys = (*METRIC_KEYS, "pairs")
        vec = torch.zeros(len(keys), dtype=torch.float64, device=t.device)
        for m in metrics:
            vec += torch.stack([m[k].double().sum() for k in keys])
        if g.dp_size > 1:
            dist.all_reduce(vec, group=g.dp)
        pairs = float(vec[-1])
        return {f"valid/{k}": float(v) / pairs for k, v in zip(keys[:-1], vec[:-1])} | {
            "valid/pairs": pairs
        }
