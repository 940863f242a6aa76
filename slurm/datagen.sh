#!/usr/bin/env bash
# longpo-datagen on Slurm: an array job, one shard per task (every generation stage of it, with
# resume), then ONE merge job once every shard succeeded:
#
#   jid=$(sbatch --parsable --array=0-7 slurm/datagen.sh)
#   sbatch --dependency=afterok:${jid} slurm/datagen.sh merge
#
# SHARDS defaults to the array size; set it for the merge job when it differs from 8.
# A requeued / rerun task resumes its shard (longpo-datagen keeps per-stage progress on disk).
#SBATCH --job-name=longpo-datagen
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --error=logs/%x-%A_%a.err

set -euo pipefail

# ---- set these (or export them before sbatch) --------------------------------------------------
# Local HF directory of the generating model (stage k's model in the self-evolution chain).
MODEL="${MODEL:-/path/to/Mistral-7B-Instruct-v0.2}"
# Long documents (JSONL / text / Parquet files or directories).
INPUT="${INPUT:-/path/to/long_documents}"
# conf/datagen/preset: longpo_128k | longpo_256k | longpo_512k (| demo)
PRESET="${PRESET:-longpo_128k}"
# Generation backend: vllm (GPU) | hf (transformers)
BACKEND="${BACKEND:-vllm}"
# Output: shard-*/ work directories, then records.jsonl + report.json after the merge.
OUT="${OUT:-/path/to/datagen/longpo_128k}"
SHARDS="${SHARDS:-${SLURM_ARRAY_TASK_COUNT:-8}}"
DATAGEN="${DATAGEN:-python -m longpo_megatron.datagen.cli}"
# ------------------------------------------------------------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"

longpo_require MODEL INPUT OUT
mkdir -p "${OUT}"
read -r -a CMD <<<"${DATAGEN}"
COMMON=(preset="${PRESET}" backend="${BACKEND}" backend.model="${MODEL}"
  "input.paths=[${INPUT}]" output_dir="${OUT}")
if [[ "${1:-}" == merge ]]; then
  shift
  echo "$(date -Is) merging ${SHARDS} shards of ${OUT}"
  longpo_srun_one "${MODEL}" "${INPUT}" "${OUT}" -- \
    "${CMD[@]}" "${COMMON[@]}" stage=merge shard="0/${SHARDS}" "$@"
  exit 0
fi
TASK="${SLURM_ARRAY_TASK_ID:?run as an array job: sbatch --array=0-N slurm/datagen.sh}"
echo "$(date -Is) datagen shard ${TASK}/${SHARDS} with ${MODEL} -> ${OUT}"
longpo_srun_one "${MODEL}" "${INPUT}" "${OUT}" -- \
  "${CMD[@]}" "${COMMON[@]}" --shard "${TASK}/${SHARDS}" "$@"
