#!/usr/bin/env bash
# The LongPO self-evolution chain in one command (run it on a login node; it only submits):
#
#   stage 1 (train from the base model on DATA)
#     -> convert (export stage 1 to HF + a megatron weights checkpoint)
#     -> datagen with stage 1's model (array over shards, then merge)
#     -> preprocess (longpo-preprocess, with stage 2's limits)
#     -> stage 2 (train from stage 1's weights on the new data) -> convert -> ...
#
# each job waiting for the previous one (--dependency=afterok, the chain is cancelled on a
# failure). The paper trains 128K from Mistral-7B-Instruct-v0.2, then 256K and 512K each from
# the 128K model: STAGES="128k 512k", then STAGES="128k 256k" with the same PIPELINE_DIR (the
# finished 128K stage resumes at its end and its conversion is kept).
#
#   PIPELINE_DIR=/scratch/longpo BASE_HF=/models/Mistral-7B-Instruct-v0.2 \
#   INIT_CKPT=/ckpt/mistral_7b_instruct_v0.2 DATA=/data/longpo_128k.jsonl DOCS=/data/long_docs \
#     bash slurm/pipeline.sh [Hydra overrides for every training stage...]
#
# Per stage: EXPERIMENT_<stage> (e.g. EXPERIMENT_128k=qwen_128k; default the stage script's
# mistral_<stage>; EXPERIMENT= for none). SHARDS datagen shards (default 8).
set -euo pipefail

STAGES="${STAGES:-128k 512k}"
PIPELINE_DIR="${PIPELINE_DIR:-/path/to/pipeline}"
BASE_HF="${BASE_HF:-/path/to/Mistral-7B-Instruct-v0.2}"     # tokenizer of stage 1
INIT_CKPT="${INIT_CKPT-/path/to/checkpoints/mistral_7b_instruct_v0.2}"
DATA="${DATA:-/path/to/data/longpo_128k.jsonl}"             # stage 1's records
DOCS="${DOCS:-/path/to/long_documents}"                     # datagen input for later stages
SHARDS="${SHARDS:-8}"
TOKENIZER="${TOKENIZER:-}"  # training tokenizer for every stage; default each stage's HF model
REPO="${REPO:-$PWD}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"

longpo_require PIPELINE_DIR BASE_HF DATA DOCS
if [[ "${INIT_CKPT}" == /path/to/* ]]; then longpo_require INIT_CKPT; fi
mkdir -p "${PIPELINE_DIR}" "${REPO}/logs"
JOBS="${PIPELINE_DIR}/jobs.txt"

# submit WHAT AFTER [VAR=value ...] -- [sbatch args...]: print the new job id, log it.
submit() {
  local what="$1" after="$2"
  shift 2
  local -a envs=()
  while [[ "$1" != -- ]]; do
    envs+=("$1")
    shift
  done
  shift
  local -a dep=()
  if [[ -n "${after}" ]]; then dep=(--dependency="afterok:${after}" --kill-on-invalid-dep=yes); fi
  local id
  id="$(env "${envs[@]}" sbatch --parsable "${dep[@]}" "$@")"
  id="${id%%;*}"  # --parsable prints "id" or "id;cluster"
  echo "${id} ${what}${after:+ after ${after}}" | tee -a "${JOBS}" >&2
  echo "${id}"
}

stage_experiment() {
  local var="EXPERIMENT_$1"
  if [[ -n "${!var+x}" ]]; then
    echo "${!var}"
  elif [[ -n "${EXPERIMENT+x}" ]]; then
    echo "${EXPERIMENT}"
  else
    echo "mistral_$1"
  fi
}

prev="" model_hf="${BASE_HF}" tok="${TOKENIZER:-${BASE_HF}}" init="${INIT_CKPT}" data="${DATA}" first=1
for stage in ${STAGES}; do
  dir="${PIPELINE_DIR}/${stage}"
  experiment="$(stage_experiment "${stage}")"
  [[ -f "${REPO}/slurm/longpo_${stage}.sh" ]] || longpo_die "no slurm/longpo_${stage}.sh for STAGES"
  if [[ "${first}" == 0 ]]; then
    gen="$(submit "datagen ${stage}" "${prev}" MODEL="${model_hf}" INPUT="${DOCS}" \
      PRESET="longpo_${stage}" OUT="${dir}/datagen" SHARDS="${SHARDS}" -- \
      --array="0-$((SHARDS - 1))" "${REPO}/slurm/datagen.sh")"
    merged="$(submit "datagen merge ${stage}" "${gen}" MODEL="${model_hf}" INPUT="${DOCS}" \
      PRESET="longpo_${stage}" OUT="${dir}/datagen" SHARDS="${SHARDS}" -- \
      "${REPO}/slurm/datagen.sh" merge)"
    prev="$(submit "preprocess ${stage}" "${merged}" SRC="${dir}/datagen/records.jsonl" \
      OUT="${dir}/prepared" HF_TOKENIZER="${TOKENIZER:-${model_hf}}" EXPERIMENT="${experiment}" \
      -- "${REPO}/slurm/preprocess.sh")"
    data="${dir}/prepared" tok="${TOKENIZER:-${model_hf}}"
  fi
  train="$(submit "train ${stage}" "${prev}" EXPERIMENT="${experiment}" DATA="${data}" \
    HF_TOKENIZER="${tok}" INIT_CKPT="${init}" RUN_DIR="${dir}/train" -- \
    "${REPO}/slurm/longpo_${stage}.sh" "$@")"
  template="${tok}"
  [[ -d "${template}" ]] || template=""
  prev="$(submit "convert ${stage}" "${train}" DIRECTION=mg2hf SRC="${dir}/train/checkpoints" \
    OUT="${dir}/hf" WEIGHTS_OUT="${dir}/weights" TEMPLATE="${template}" -- \
    "${REPO}/slurm/convert.sh")"
  model_hf="${dir}/hf" init="${dir}/weights" first=0
done
echo "submitted; job ids in ${JOBS}; final model: ${model_hf}" >&2
