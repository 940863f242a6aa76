#!/usr/bin/env python
"""HF Llama / Mistral / Qwen2 directory -> megatron weights checkpoint (any TP/PP can load it).

    python tools/convert_hf_to_megatron.py /models/Mistral-7B-Instruct-v0.2 ckpt/mistral_init \
        --rotary-base 1e7
    # same as: longpo-convert-hf-to-megatron ...

Writes ckpt/mistral_init/{latest, iter_0000000/, hf/, model.yaml}. See --help.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longpo_megatron.export.cli import hf_to_megatron_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
