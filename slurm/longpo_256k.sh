#!/usr/bin/env bash
# LongPO 256K stage: Mistral-7B-LongPO-128K -> 256K on 2 nodes x 8 GPUs (experiment=mistral_256k:
# TP=2 x CP=4 x DP=2). Qwen2.5 with YaRN: EXPERIMENT=qwen_256k (starts from Qwen2.5-7B-Instruct).
#
#   sbatch slurm/longpo_256k.sh [extra Hydra overrides...]          (from the repository root)
#
# Everything else (run directory from job name + override hash, resume, container or current
# environment, NCCL/IB pass-through, USR1 / exit-3 requeue) is slurm/launcher.sh: docs/launch.md.
#SBATCH --job-name=longpo-256k
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

set -euo pipefail

# ---- set these (or export them before sbatch) --------------------------------------------------
EXPERIMENT="${EXPERIMENT-mistral_256k}"
# Preference records (JSONL, docs/data-format.md) or a prepared dataset directory.
DATA="${DATA:-/path/to/data/longpo_256k}"
# Local HF tokenizer directory of the starting model.
HF_TOKENIZER="${HF_TOKENIZER:-/path/to/Mistral-7B-LongPO-128K-hf}"
# Megatron weights to start from (tools/convert_hf_to_megatron.py or slurm/convert.sh output).
INIT_CKPT="${INIT_CKPT-/path/to/checkpoints/mistral_7b_longpo_128k}"
SAVE_INTERVAL="${SAVE_INTERVAL:-50}"
# ------------------------------------------------------------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"
longpo_train "$@"
