"""``longpo-train`` / ``python -m longpo_megatron.train``: parse, validate, build, run, close.

Launch with torchrun, e.g. ``torchrun --nproc-per-node 2 -m longpo_megatron.train
parallel=tp2``; any config key can be overridden Hydra-style (``longpo.beta=0.1``).
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from longpo_megatron.config import register_configs, to_config
from longpo_megatron.config_validation import validate_config
from longpo_megatron.errors import report_user_errors
from longpo_megatron.preemption import PreemptionHandler, StopRequested
from longpo_megatron.process import die_with_parent, silence_fallback_warnings

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LONGPO_ROOT", str(REPO_ROOT))
PREEMPTION = PreemptionHandler()
"""Installed by :func:`main` at process start, before any data or reference work, so a
SIGTERM / SIGUSR1 during setup is recorded (setup then stops cleanly)."""


@hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name="config")
@report_user_errors
def _hydra_main(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_config(cfg, world_size=world, cuda_available=torch.cuda.is_available())
    from longpo_megatron.checkpoint.paths import check_save_root  # megatron: after validation
    from longpo_megatron.trainer import Trainer

    if cfg.checkpoint.save:
        check_save_root(cfg.checkpoint.save)
    trainer = Trainer(cfg, layout, PREEMPTION)
    try:
        trainer.setup().run()
    except StopRequested:
        pass  # a signal during setup: said by the trainer; exit 0, the job resumes later
    finally:
        trainer.close()
    if trainer.exit_code:
        raise SystemExit(trainer.exit_code)  # REQUEUE_EXIT_CODE: stopped before the time limit


def main() -> None:
    """Console entry point."""
    die_with_parent()  # a rank never outlives its launcher
    PREEMPTION.install()
    silence_fallback_warnings()
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
