#!/usr/bin/env bash
# LongPO 128K stage: Mistral-7B-Instruct-v0.2 -> 128K on 1 node x 8 GPUs (experiment=mistral_128k:
# TP=2 x CP=4, DP=1, 8 pairs per step = the authors' 1 x 8 accumulation).
# Qwen2.5-7B-Instruct: EXPERIMENT=qwen_128k with its DATA, HF_TOKENIZER and INIT_CKPT.
# More nodes (--nodes=N, N dividing 8) add data-parallel replicas; accumulation becomes 8/N.
#
#   mkdir -p logs && sbatch slurm/longpo_128k.sh [extra Hydra overrides...]
#
# cpus-per-task: CPUs for torchrun's 8 workers and data loading (srun gets it explicitly).
# Preemption / time limit: Slurm sends USR1 to this script 120 s before the limit; the trap
# forwards it to the trainers, which save at the next step boundary and exit; the script then
# requeues the job (same job id) and the requeued run resumes from CKPT_DIR's latest checkpoint.
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
# NGC PyTorch container (TransformerEngine, apex) with this project installed
# (pip install -e .[gpu,hf]); an enroot .sqsh file or an image reference pyxis can pull.
CONTAINER="${CONTAINER:-/path/to/longpo-megatron_ngc-pytorch.sqsh}"
# LongPO 128K preference records (JSONL, docs/design.md schema).
DATA="${DATA:-/path/to/data/longpo_128k.jsonl}"
# Local HF tokenizer directory of the starting model.
HF_TOKENIZER="${HF_TOKENIZER:-/path/to/Mistral-7B-Instruct-v0.2}"
# Where this run saves checkpoints and resumes from after a requeue.
CKPT_DIR="${CKPT_DIR:-/path/to/checkpoints/mistral_128k}"
# Megatron checkpoint of the starting model, loaded when CKPT_DIR has no checkpoint yet.
INIT_CKPT="${INIT_CKPT:-/path/to/checkpoints/mistral_7b_instruct_v0.2}"
# Run directory (metrics.jsonl, TensorBoard) on shared storage.
OUT_DIR="${OUT_DIR:-/path/to/runs/mistral_128k}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"
EXPERIMENT="${EXPERIMENT:-mistral_128k}"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# -------------------------------------------------------------------------------------------------

for var in CONTAINER DATA HF_TOKENIZER CKPT_DIR INIT_CKPT OUT_DIR; do
  if [[ "${!var}" == /path/to/* ]]; then
    echo "error: set ${var} (at the top of $0 or in the environment)" >&2
    exit 2
  fi
done
mkdir -p "${CKPT_DIR}" "${OUT_DIR}"

# Resume from this run's own checkpoints when there are any (a requeued job), else start
# from the initial model.
if [[ -e "${CKPT_DIR}/latest" ]]; then
  LOAD_DIR="${CKPT_DIR}"
else
  LOAD_DIR="${INIT_CKPT}"
fi

MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed -n 1p)"  # sed reads all input: no SIGPIPE under pipefail
MOUNTS="${REPO}:/workspace/longpo,$(dirname "${DATA}"),${HF_TOKENIZER},${CKPT_DIR}"
MOUNTS+=",${INIT_CKPT},${OUT_DIR}"
export MASTER_ADDR
export LONGPO_ROOT=/workspace/longpo
export PYTHONPATH=/workspace/longpo
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron TP/SP comm-compute overlap ordering
export OMP_NUM_THREADS=8
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# Preemption / time limit: Slurm sends USR1 to this script. Forward it to the trainer processes
# (torchrun itself ignores USR1, see below), let them save at the next step boundary and exit,
# then requeue. Requeueing first would kill the running step before it saves.
PREEMPTED=0
on_usr1() {
  PREEMPTED=1
  echo "$(date -Is) USR1: asking the trainers to save a checkpoint and stop"
  # "[l]ongpo" matches the trainers but not this command line itself.
  srun --overlap --nodes="${SLURM_NNODES}" --ntasks-per-node=1 \
    pkill -USR1 -f "[l]ongpo_megatron.train" || true
}
trap on_usr1 USR1

echo "$(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} nodes," \
  "master ${MASTER_ADDR}, load ${LOAD_DIR}"

# One task per node; each runs torchrun for the node's 8 GPUs (c10d rendezvous on the master).
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK}" --kill-on-bad-exit=1 \
  --container-image="${CONTAINER}" --container-mounts="${MOUNTS}" \
  --container-workdir=/workspace/longpo --no-container-mount-home \
  bash -c 'trap "" USR1; exec "$@"' ignore-usr1 torchrun --nnodes "${SLURM_NNODES}" --nproc-per-node 8 \
    --rdzv-id "${SLURM_JOB_ID}" --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:29500" \
    -m longpo_megatron.train experiment="${EXPERIMENT}" \
      data.path="${DATA}" data.tokenizer="${HF_TOKENIZER}" \
      checkpoint.save="${CKPT_DIR}" checkpoint.load="${LOAD_DIR}" \
      checkpoint.save_interval="${SAVE_INTERVAL}" logging.output_dir="${OUT_DIR}" \
      "$@" &
SRUN_PID=$!

# `wait` returns early when the USR1 trap runs; keep waiting for the step itself.
rc=0
wait "${SRUN_PID}" || rc=$?
while kill -0 "${SRUN_PID}" 2>/dev/null; do
  wait "${SRUN_PID}" || rc=$?
done
if [ "${PREEMPTED}" = 1 ]; then
  echo "$(date -Is) trainers stopped (rc ${rc}); requeueing ${SLURM_JOB_ID} to resume from ${CKPT_DIR}"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "${rc}"
