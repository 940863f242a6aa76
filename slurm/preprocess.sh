#!/usr/bin/env bash
# longpo-preprocess job: records (JSONL) -> a prepared dataset directory for the next stage,
# with the data limits of that stage's experiment (docs/data-format.md).
#   SRC=records.jsonl OUT=prepared/ HF_TOKENIZER=<hf dir> EXPERIMENT=mistral_512k \
#     sbatch slurm/preprocess.sh [data.* overrides...]
#SBATCH --job-name=longpo-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

set -euo pipefail

# ---- set these (or export them before sbatch) --------------------------------------------------
SRC="${SRC:-/path/to/datagen/records.jsonl}"
OUT="${OUT:-/path/to/prepared/longpo_512k}"
HF_TOKENIZER="${HF_TOKENIZER:-/path/to/Mistral-7B-LongPO-128K-hf}"
EXPERIMENT="${EXPERIMENT-mistral_512k}"
PREPROCESS="${PREPROCESS:-python -m longpo_megatron.data.preprocess}"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}"
# ------------------------------------------------------------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"

longpo_require SRC OUT HF_TOKENIZER
read -r -a CMD <<<"${PREPROCESS}"
experiment=()
if [[ -n "${EXPERIMENT}" ]]; then experiment=("experiment=${EXPERIMENT}"); fi
mkdir -p "$(dirname "${OUT}")"
longpo_srun_one "${SRC}" "${HF_TOKENIZER}" "$(dirname "${OUT}")" -- \
  "${CMD[@]}" --output "${OUT}" --workers "${WORKERS}" "${experiment[@]}" \
  data.path="${SRC}" data.tokenizer="${HF_TOKENIZER}" "$@"
