#!/usr/bin/env bash
# Checkpoint conversion job (CPU is enough; one task):
#   SRC=<megatron checkpoint root> OUT=<hf dir> sbatch slurm/convert.sh             (to HF)
#   DIRECTION=hf2mg SRC=<hf dir> OUT=<megatron root> sbatch slurm/convert.sh       (from HF)
# DIRECTION=mg2hf also writes WEIGHTS_OUT (if set): the HF export converted back to a megatron
# weights checkpoint, the next stage's INIT_CKPT (a training checkpoint would resume its
# optimizer and step count instead of starting a new stage). An output that is already
# complete is kept (a rerun or requeue does no work twice).
#SBATCH --job-name=longpo-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=256G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

set -euo pipefail

# ---- set these (or export them before sbatch) --------------------------------------------------
DIRECTION="${DIRECTION:-mg2hf}"
SRC="${SRC:-/path/to/checkpoints/run}"
OUT="${OUT:-/path/to/hf/run}"
WEIGHTS_OUT="${WEIGHTS_OUT:-}"
# HF directory giving tokenizer files and token ids to the export (default: the checkpoint's).
TEMPLATE="${TEMPLATE:-}"
PYTHON="${PYTHON:-python}"
# ------------------------------------------------------------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"

longpo_require SRC OUT
template=()
if [[ -n "${TEMPLATE}" ]]; then template=(--template "${TEMPLATE}"); fi
to_megatron() {  # hf dir -> megatron weights root, unless already converted
  if [[ -e "$2/latest" ]]; then echo "kept $2 (already converted)"; return; fi
  longpo_srun_one "$1" "$(dirname "$2")" -- \
    "${PYTHON}" tools/convert_hf_to_megatron.py "$1" "$2" --no-progress
}
case "${DIRECTION}" in
  mg2hf)
    if [[ -e "${OUT}/config.json" ]]; then
      echo "kept ${OUT} (already exported)"
    else
      longpo_srun_one "${SRC}" "$(dirname "${OUT}")" "${TEMPLATE}" -- \
        "${PYTHON}" tools/convert_megatron_to_hf.py "${SRC}" "${OUT}" "${template[@]}" --no-progress
    fi
    if [[ -n "${WEIGHTS_OUT}" ]]; then to_megatron "${OUT}" "${WEIGHTS_OUT}"; fi
    ;;
  hf2mg) to_megatron "${SRC}" "${OUT}" ;;
  *) longpo_die "DIRECTION=${DIRECTION}: must be mg2hf or hf2mg" ;;
esac
