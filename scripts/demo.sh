#!/usr/bin/env bash
# Set up (idempotent) and run the demo: the whole LongPO self-evolution loop on this CPU, offline
# (docs/demo.md): the shipped short-context model (data/demo-model) writes its own short-to-long
# preference data, SFT / DPO / LongPO train on it on 2 ranks, longpo-eval compares them at a short
# and a long length. Results in outputs/demo/ (table.md, accuracy.png, summary.json, hf/longpo);
# a rerun replaces them. Extra arguments go to `longpo-demo run` (--quick, --out-dir DIR, --help);
# DEMO_PARALLEL=pp2 or dp2 trains with pipeline / data parallelism instead of tensor parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LONGPO_ROOT="$PWD" OMP_NUM_THREADS=1
exec .venv/bin/python -m longpo_megatron.demo.cli run --overwrite --parallel "${DEMO_PARALLEL:-tp2}" "$@"
