"""Rank worker of the held-out validation test (top-level so ``run_distributed`` can spawn it)."""

from __future__ import annotations

from typing import Any

from gather import gather_full_state
from parity_common import parity_config


def validation_worker(rank: int, world: int, *, tp: int, data: str, tmp: str) -> dict[str, Any]:
    """2 steps with 2 of 8 pairs held out (validated after each step), then a resume that must
    restore the held-out reference scores from the checkpoint."""
    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.trainer import Trainer

    def make(load: str | None):
        cfg = parity_config(tp, 1, 1, data, tmp)
        cfg.train.train_iters = 2
        cfg.train.global_batch_size = 2
        cfg.train.valid_interval = 1
        cfg.data.validation_fraction = 0.25
        cfg.checkpoint.save, cfg.checkpoint.load = f"{tmp}/ckpt", load
        return Trainer(cfg, validate_config(cfg, world_size=world, cuda_available=False)).setup()

    trainer = make(None)
    layers, groups = trainer.cfg.model.num_layers, trainer.groups
    out: dict[str, Any] = {"init": gather_full_state(trainer.model, groups, num_layers=layers)}
    valid = trainer.validator.dataset  # a lazy view of the prepared data: read pair by pair
    out["valid_pairs"] = [valid[i] for i in range(len(valid))]
    out["train_size"] = len(trainer.dataset)
    out["history"] = trainer.run()
    out["final"] = gather_full_state(trainer.model, trainer.groups, num_layers=layers)
    out["table"] = trainer.validator.dataset.ref_state()
    out["logging_rank"] = trainer.groups.is_logging_rank
    trainer.preemption.uninstall()  # process groups stay up for the resumed trainer
    resumed = make(f"{tmp}/ckpt")
    out["resumed_table"] = resumed.validator.dataset.ref_state()
    resumed.close()
    return out
