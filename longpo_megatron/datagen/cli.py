"""``longpo-datagen``: make LongPO short-to-long preference data with the model itself.

    longpo-datagen backend.model=/models/Mistral-7B-Instruct-v0.2 preset=longpo_128k
    longpo-datagen --shard 3/8 stage=instructions ...     # one stage of one shard (Slurm array)
    longpo-datagen stage=merge shard=0/8 ...              # join the finished shards

Any key of ``longpo_megatron/datagen/config.py`` can be overridden Hydra-style.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from longpo_megatron.datagen.backends import GenerationBackend, build_backend
from longpo_megatron.datagen.config import (
    DatagenConfig,
    DatagenConfigError,
    register_datagen_configs,
    to_datagen_config,
    validate_datagen_config,
)
from longpo_megatron.datagen.merge import merge_shards
from longpo_megatron.datagen.pipeline import ShardPipeline
from longpo_megatron.errors import report_user_errors

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf" / "datagen"
"""Absolute, so the console script and ``python -m`` find the same tree."""
os.environ.setdefault("LONGPO_ROOT", str(REPO_ROOT))
FLAG_KEYS = ("shard", "stage", "seed", "output_dir")
"""``--key value`` / ``--key=value`` flags accepted as aliases of ``key=value``."""


def run(cfg: DatagenConfig, backend: Optional[GenerationBackend] = None) -> dict[str, Any]:
    """Validate, then run ``cfg.stage`` for ``cfg.shard`` (or merge); returns the report."""
    validate_datagen_config(cfg)
    if cfg.stage == "merge":
        return merge_shards(cfg)
    if backend is not None:
        return ShardPipeline(cfg, backend).run(cfg.stage)
    pipe = ShardPipeline(cfg, lambda: build_backend(cfg.backend))
    try:
        return pipe.run(cfg.stage)
    finally:
        pipe.close()


def flags_to_overrides(argv: list[str]) -> list[str]:
    """Rewrite ``--shard 3/8`` and ``--shard=3/8`` (and the other FLAG_KEYS) Hydra-style."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and name in FLAG_KEYS:
            if not eq:
                if i + 1 >= len(argv):
                    raise DatagenConfigError(f"longpo-datagen: {arg} needs a value")
                value, i = argv[i + 1], i + 1
            out.append(f"{name}={value}")
        else:
            out.append(arg)
        i += 1
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="datagen")
@report_user_errors
def _hydra_main(dcfg: DictConfig) -> None:
    run(to_datagen_config(dcfg))


@report_user_errors
def main() -> None:
    """Console entry point."""
    sys.argv[1:] = flags_to_overrides(sys.argv[1:])
    register_datagen_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
