#!/usr/bin/env bash
# Set up (idempotent) and run the demo: LongPO on the bundled toy preference data with the tiny
# model on 2 CPU ranks (tensor parallel by default; DEMO_PARALLEL=pp2 or dp2 for the others).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LONGPO_ROOT="$PWD" OMP_NUM_THREADS=1
.venv/bin/python -m longpo_megatron.launch --nproc-per-node 2 -m longpo_megatron.train \
  parallel="${DEMO_PARALLEL:-tp2}" optim=demo train=demo logging.output_dir=outputs/demo "$@"
