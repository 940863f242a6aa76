#!/usr/bin/env python
"""Megatron checkpoint (root, its ``latest``, or an iter dir; any TP/PP) -> HF directory.

    python tools/convert_megatron_to_hf.py outputs/run/ckpt hf_out \
        --template /models/Mistral-7B-Instruct-v0.2 --max-shard-size 5GB
    # same as: longpo-convert-megatron-to-hf ...

Writes sharded safetensors + model.safetensors.index.json + config.json + tokenizer files.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longpo_megatron.export.cli import megatron_to_hf_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
