"""Rank workers of the checkpoint tests (top-level functions so ``run_distributed`` can spawn them).

Runs use the tiny parity model on the first 4 toy records, 2 pairs per step, 4 steps, fp32 CPU.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any, Optional

import numpy as np
import torch
from gather import gather_full_state
from parity_common import parity_config

STEPS = 4
GLOBAL_BATCH = 2


def make_config(
    tp: int, pp: int, data: str, out: str, save: Optional[str] = None, load: Optional[str] = None
):
    """The checkpoint-test run: parity config, 4 steps of 2 pairs."""
    cfg = parity_config(tp, pp, 1, data, out)
    cfg.train.train_iters = STEPS
    cfg.train.global_batch_size = GLOBAL_BATCH
    cfg.train.log_interval = 100
    cfg.checkpoint.save = save
    cfg.checkpoint.load = load
    return cfg


def make_trainer(world: int, cfg):
    """``Trainer(cfg).setup()`` (process groups are reused when already up)."""
    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.trainer import Trainer

    layout = validate_config(cfg, world_size=world, cuda_available=False)
    return Trainer(cfg, layout).setup()


def _losses(history: list[dict[str, float]]) -> list[float]:
    return [h["loss"] for h in history]


def _signal_at(trainer, step: int, sig: int) -> None:
    """Make this rank send itself ``sig`` right after optimizer step ``step``."""
    original = trainer.train_step

    def stepping():
        out = original()
        if trainer.state.step == step:
            os.kill(os.getpid(), sig)
        return out

    trainer.train_step = stepping


def _py_np_draws() -> tuple[float, float]:
    """One draw from python's and numpy's global generators (advances both)."""
    return random.random(), float(np.random.rand())


def resume_worker(
    rank: int, world: int, *, tp: int, pp: int, data: str, tmp: str, signal_rank: int
) -> dict[str, Any]:
    """Uninterrupted 4 steps (A) vs. preempted at step 2 (P) + fresh resume to step 4 (B).

    P is stopped by SIGUSR1 on ``signal_rank`` only: every rank must agree, save and return.
    Returns losses, step counts, RNG evidence and (rank 0) the gathered final weights.
    """
    layers = 4
    root_a, root_p = f"{tmp}/a", f"{tmp}/p"
    a = make_trainer(world, make_config(tp, pp, data, tmp, save=root_a))
    out: dict[str, Any] = {"a_losses": _losses(a.run())}
    out["a_final"] = gather_full_state(a.model, a.groups, num_layers=layers)

    p = make_trainer(world, make_config(tp, pp, data, tmp, save=root_p))
    random.seed(1000 + rank)  # python / numpy states that differ per rank
    np.random.seed(2000 + rank)
    if rank == signal_rank:
        _signal_at(p, 2, signal.SIGUSR1)
    p_losses = _losses(p.run())
    out.update(p_losses=p_losses, p_step=p.state.step, p_preempted=p.preempted)
    out["rng_at_save"], out["py_np_at_save"] = torch.get_rng_state(), _py_np_draws()
    p.preemption.uninstall()

    b = make_trainer(world, make_config(tp, pp, data, tmp, save=root_p, load=root_p))
    out["rng_after_load"], out["py_np_after_load"] = torch.get_rng_state(), _py_np_draws()
    out["b_start"] = b.state.step
    out["b_losses"] = _losses(b.run())
    out["b_final"] = gather_full_state(b.model, b.groups, num_layers=layers)
    out["logging_rank"] = b.groups.is_logging_rank
    out["roots"] = (root_a, root_p)
    b.close()
    return out


def _full(trainer) -> dict[str, torch.Tensor]:
    return gather_full_state(trainer.model, trainer.groups, num_layers=4)


def reshard_worker(
    rank: int, world: int, *, data: str, tmp: str, sources: dict[str, str]
) -> dict[str, Any]:
    """World 1 (TP=1, PP=1): load each source checkpoint, gather, re-save; bad shapes; weights.

    ``sources``: name -> checkpoint root saved at another layout.
    """
    from parity_common import TINY

    from longpo_megatron import checkpoint
    from longpo_megatron.config import ModelConfig
    from longpo_megatron.model.gpt import build_model

    out: dict[str, Any] = {"loaded": {}, "resaved": {}}
    for name, root in sources.items():
        t = make_trainer(world, make_config(1, 1, data, tmp, save=f"{tmp}/re_{name}", load=root))
        out["loaded"][name] = (_full(t), t.state.step, t.engine.optimizer.state_dict()["state"])
        out["resaved"][name] = str(t.save_checkpoint())
        t.preemption.uninstall()

    # weights-only checkpoint of the last loaded model -> fresh optimizer, step 0, scored reference
    w_root = f"{tmp}/weights"
    checkpoint.save_weights(w_root, t.model, t.groups, config=t.run_cfg, extra={"note": "test"})
    w = make_trainer(world, make_config(1, 1, data, tmp, load=w_root))
    out["weights"] = dict(
        full=_full(w),
        step=w.state.step,
        optim_state=len(w.engine.optimizer.state_dict()["state"]),
        ref_scored=w.dataset.has_ref_logps,
        ref_table=w.dataset.ref_state(),
        common_note=checkpoint.read_common(checkpoint.resolve(w_root)).get("note"),
    )
    w.preemption.uninstall()

    # a checkpoint of a different shape: error names the path and the key
    bad_cfg = ModelConfig(**{**TINY, "ffn_hidden_size": 96})
    bad = build_model(bad_cfg, w.mlayout, w.groups)
    try:
        checkpoint.load(next(iter(sources.values())), bad, w.groups)
        out["bad_shape_error"] = None
    except checkpoint.CheckpointError as e:
        out["bad_shape_error"] = str(e)
    w.close()
    return out


def common_write_fails_worker(rank: int, world: int, *, data: str, tmp: str) -> str:
    """Rank 0 cannot write ``common.pt`` (ENOSPC): every rank must raise the same named error
    instead of the others waiting in the sharded save until the collective timeout."""
    import errno

    from longpo_megatron import checkpoint
    from longpo_megatron.checkpoint.paths import CheckpointError

    trainer = make_trainer(world, make_config(2, 1, data, tmp))
    if rank == 0:
        real_save = torch.save

        def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            name = str(getattr(f, "name", f))
            if name.endswith("common.pt"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            real_save(obj, f, *args, **kwargs)

        torch.save = full_disk
    try:
        checkpoint.save(
            f"{tmp}/ckpt", 1, trainer.model, trainer.groups, optimizer=trainer.engine.optimizer
        )
    except CheckpointError as e:
        return str(e)
    finally:
        trainer.close()
    return "saved"
