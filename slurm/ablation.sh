#!/usr/bin/env bash
# Ablation grid: an array job over override sets. Each non-comment line of GRID is one set of
# Hydra overrides; array task i trains with line i (0-based) plus the command-line overrides.
# Every set gets its own run directory (job name + hash of its overrides): no collisions, and a
# requeued task resumes its own run.
#
#   sbatch --array=0-3 slurm/ablation.sh slurm/grids/beta_lambda.txt [overrides for all...]
#   EXPERIMENT=qwen_128k sbatch --array=0-3%2 slurm/ablation.sh my_grid.txt   (2 at a time)
#
# The header is the 128K stage's (1 node x 8 GPUs); give sbatch --nodes=N for longer stages.
#SBATCH --job-name=longpo-ablation
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
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --error=logs/%x-%A_%a.err

set -euo pipefail

# ---- set these (or export them before sbatch) --------------------------------------------------
EXPERIMENT="${EXPERIMENT-mistral_128k}"
DATA="${DATA:-/path/to/data/longpo_128k.jsonl}"
HF_TOKENIZER="${HF_TOKENIZER:-/path/to/Mistral-7B-Instruct-v0.2}"
INIT_CKPT="${INIT_CKPT-/path/to/checkpoints/mistral_7b_instruct_v0.2}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"
# ------------------------------------------------------------------------------------------------
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/launcher.sh
source "${REPO}/slurm/launcher.sh"

GRID="${1:-}"
[[ -f "${GRID}" ]] || longpo_die "usage: sbatch --array=0-N slurm/ablation.sh GRID_FILE [overrides...]"
shift
mapfile -t SETS < <(grep -Ev '^[[:space:]]*(#|$)' "${GRID}")
TASK="${SLURM_ARRAY_TASK_ID:-}"
if [[ -z "${TASK}" || "${TASK}" -ge "${#SETS[@]}" ]]; then
  longpo_die "${GRID} has ${#SETS[@]} override sets: submit with --array=0-$((${#SETS[@]} - 1))" \
    "(array task '${TASK}')"
fi
read -r -a OVERRIDES <<<"${SETS[${TASK}]}"
echo "ablation ${GRID} set ${TASK}: ${SETS[${TASK}]}"
longpo_train "${OVERRIDES[@]}" "$@"
