#!/usr/bin/env bash
# LongPO 128K stage: Mistral-7B-Instruct-v0.2 -> 128K on 1 node x 8 GPUs (experiment=mistral_128k:
# TP=2 x CP=2 x DP=2, 8 pairs per step). Qwen2.5: EXPERIMENT=qwen_128k; Llama-3.1:
# EXPERIMENT=llama3_1_128k (with their DATA, HF_TOKENIZER, INIT_CKPT). More nodes add DP replicas.
#
#   sbatch slurm/longpo_128k.sh [extra Hydra overrides...]          (from the repository root)
#
# Everything else (run directory from job name + override hash, resume, container or current
# environment, NCCL/IB pass-through, USR1 / exit-3 requeue) is slurm/launcher.sh: docs/launch.md.
#SBATCH --job-name=longpo-128k
#SBATCH --nodes=1
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
EXPERIMENT="${EXPERIMENT-mistral_128k}"
# Preference records (JSONL, docs/data-format.md) or a prepared dataset directory.
DATA="${DATA:-/path/to/data/longpo_128k.jsonl}"
# Local HF tokenizer directory of the starting model.
HF_TOKENIZER="${HF_TOKENIZER:-/path/to/Mistral-7B-Instruct-v0.2}"
# Megatron weights to start from (tools/convert_hf_to_megatron.py or slurm/convert.sh output).
INIT_CKPT="${INIT_CKPT-/path/to/checkpoints/mistral_7b_instruct_v0.2}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"
# ------------------------------------------------------------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"
longpo_train "$@"
