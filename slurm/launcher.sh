# shellcheck shell=bash
# The one Slurm launcher: sourced by the thin per-stage scripts (longpo_128k.sh, longpo_256k.sh,
# longpo_512k.sh, ablation.sh) and by pipeline.sh. Not run on its own. docs/launch.md.
#
# Settings (environment, or the stage script's defaults):
#   EXPERIMENT     conf/experiment preset (empty: none, the plain conf/config.yaml defaults)
#   DATA           preference records: JSONL or a prepared dataset directory
#   HF_TOKENIZER   local HF tokenizer directory (or "byte")
#   INIT_CKPT      weights to start from when the run has no checkpoint yet (empty: random init)
#   RUNS_ROOT      where run directories go (default: $REPO/outputs/runs; use shared storage)
#   RUN_DIR        this run's directory (default: $RUNS_ROOT/<job name>-<hash of the overrides>)
#   CKPT_DIR       checkpoints (default: $RUN_DIR/checkpoints); OUT_DIR metrics (default: $RUN_DIR)
#   CONTAINER      enroot/pyxis image; unset or empty = run in the current environment
#   LONGPO_ENV_FILE  a file sourced before launching (modules, venv, NCCL/IB settings)
#   LAUNCH         the trainer launch command (default: python -m longpo_megatron.launch, i.e.
#                  torchrun that passes exit codes 2/3 through and ends quietly on SIGTERM)
#   NPROC_PER_NODE trainer processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   SAVE_INTERVAL  checkpoint every N steps; MASTER_PORT rendezvous port (default 29500)

LONGPO_REQUEUE_EXIT_CODE=3  # longpo_megatron/errors.py REQUEUE_EXIT_CODE (tests check they agree)
LONGPO_ENV_PREFIXES=(NCCL_ TORCH_NCCL_ UCX_ FI_ IBV_ OMPI_MCA_ PMIX_MCA_ CUDA_DEVICE_MAX_)
LAUNCH="${LAUNCH:-python -m longpo_megatron.launch}"
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
RUNS_ROOT="${RUNS_ROOT:-${REPO}/outputs/runs}"

longpo_die() {
  echo "error: $*" >&2
  exit 2
}

# Refuse placeholder (/path/to/...) or empty values of the named required variables.
longpo_require() {
  local var
  for var in "$@"; do
    if [[ -z "${!var:-}" || "${!var}" == /path/to/* ]]; then
      longpo_die "set ${var} (at the top of the stage script or in the environment)"
    fi
  done
}

# Site hook, then every NCCL / InfiniBand / UCX / libfabric variable exported so srun (and the
# container, which inherits srun's environment) passes it through; logged for the record.
longpo_setup_env() {
  if [[ -n "${LONGPO_ENV_FILE:-}" ]]; then
    # shellcheck source=/dev/null
    source "${LONGPO_ENV_FILE}"
  fi
  local prefix var
  for prefix in "${LONGPO_ENV_PREFIXES[@]}"; do
    while read -r var; do
      [[ -n "${var}" ]] || continue
      export "${var?}"
      echo "env ${var}=${!var}"
    done < <(compgen -v "${prefix}" || true)
  done
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
}

# <job name>-<10 hex of sha1(experiment, data, init, overrides)>: the same settings always map to
# the same directory (a requeued job resumes there); different ablations never share one.
longpo_run_name() {
  local name="$1"
  shift
  local hash
  hash="$(printf '%s\n' "${EXPERIMENT:-}" "${DATA:-}" "${INIT_CKPT:-}" "$@" | sha1sum | cut -c1-10)"
  echo "${name}-${hash}"
}

# srun's wrapper arguments: the container flags when CONTAINER is set (the repo and the given
# paths mounted: directories themselves, files by their directory), else nothing (the current
# environment: the repo is the working directory and on PYTHONPATH).
longpo_container_args() {
  CONTAINER_ARGS=()
  WORKDIR="${REPO}"
  if [[ -n "${CONTAINER:-}" ]]; then
    WORKDIR=/workspace/longpo
    local mounts="${REPO}:${WORKDIR}" p
    for p in "$@"; do
      if [[ -d "${p}" ]]; then
        mounts+=",${p}"
      elif [[ -e "${p}" ]]; then
        mounts+=",$(dirname "${p}")"
      fi
    done
    CONTAINER_ARGS=(--container-image="${CONTAINER}" --container-mounts="${mounts}"
      --container-workdir="${WORKDIR}" --no-container-mount-home)
  fi
  export LONGPO_ROOT="${WORKDIR}" PYTHONPATH="${WORKDIR}${PYTHONPATH:+:${PYTHONPATH}}"
}

# One task (on the first node of the allocation) running a command in the job's environment or
# container: datagen, conversion, preprocessing. Mount paths first, then -- and the command.
longpo_srun_one() {
  local -a paths=()
  while [[ $# -gt 0 && "$1" != -- ]]; do
    paths+=("$1")
    shift
  done
  shift
  longpo_setup_env
  longpo_container_args "${paths[@]}"
  srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "${CONTAINER_ARGS[@]}" "$@"
}

# Preemption / time limit: Slurm sends USR1 to the batch script (--signal=B:USR1@120). Forward
# it to the trainer processes (the launch wrapper ignores it, see longpo_train), let them save at
# the next step boundary and exit, then requeue. Requeueing first would kill the step unsaved.
PREEMPTED=0
longpo_on_usr1() {
  PREEMPTED=1
  echo "$(date -Is) USR1: asking the trainers to save a checkpoint and stop"
  # "[l]ongpo" matches the trainers but not this command line itself.
  srun --overlap --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 \
    pkill -USR1 -f "[l]ongpo_megatron.train" || true
}

# Wait for the backgrounded srun; `wait` returns early whenever the USR1 trap runs.
longpo_wait() {
  local pid="$1" rc=0
  wait "${pid}" || rc=$?
  while kill -0 "${pid}" 2>/dev/null; do
    rc=0
    wait "${pid}" || rc=$?
  done
  return "${rc}"
}

# Requeue (same job id; the run resumes from CKPT_DIR) after USR1 or a trainer that exited
# with REQUEUE_EXIT_CODE (it saved and asked to continue in a new allocation).
longpo_finish() {
  local rc="$1"
  if [[ "${PREEMPTED}" == 1 || "${rc}" == "${LONGPO_REQUEUE_EXIT_CODE}" ]]; then
    echo "$(date -Is) trainers stopped (rc ${rc}); requeueing ${SLURM_JOB_ID} to resume from ${CKPT_DIR}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  exit "${rc}"
}

# The training job: run directory, resume-or-init, one srun task per node running LAUNCH.
longpo_train() {
  longpo_require DATA HF_TOKENIZER
  if [[ "${INIT_CKPT:-}" == /path/to/* ]]; then longpo_require INIT_CKPT; fi
  RUN_DIR="${RUN_DIR:-${RUNS_ROOT}/$(longpo_run_name "${SLURM_JOB_NAME:-longpo}" "$@")}"
  CKPT_DIR="${CKPT_DIR:-${RUN_DIR}/checkpoints}"
  OUT_DIR="${OUT_DIR:-${RUN_DIR}}"
  mkdir -p "${CKPT_DIR}" "${OUT_DIR}" "${REPO}/logs"
  printf '%s\n' "experiment=${EXPERIMENT:-}" "data=${DATA}" "init=${INIT_CKPT:-}" "$@" \
    >"${RUN_DIR}/overrides.txt"
  local load="${INIT_CKPT:-null}"
  if [[ -e "${CKPT_DIR}/latest" ]]; then load="${CKPT_DIR}"; fi  # a requeued / rerun job
  longpo_setup_env
  longpo_container_args "${RUN_DIR}" "${CKPT_DIR}" "${OUT_DIR}" "${DATA}" "${HF_TOKENIZER}" \
    "${INIT_CKPT:-}"
  local master nproc
  master="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | sed -n 1p)"  # no SIGPIPE
  nproc="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  local -a launch experiment=()
  read -r -a launch <<<"${LAUNCH}"
  if [[ -n "${EXPERIMENT:-}" ]]; then experiment=("experiment=${EXPERIMENT}"); fi
  trap longpo_on_usr1 USR1
  echo "$(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES:-1}" \
    "nodes x ${nproc}, master ${master}, run ${RUN_DIR}, load ${load}"
  srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
    "${CONTAINER_ARGS[@]}" \
    bash -c 'trap "" USR1; exec "$@"' ignore-usr1 "${launch[@]}" \
    --nnodes "${SLURM_NNODES:-1}" --nproc-per-node "${nproc}" \
    --rdzv-id "${SLURM_JOB_ID}" --rdzv-backend c10d \
    --rdzv-endpoint "${master}:${MASTER_PORT:-29500}" \
    -m longpo_megatron.train "${experiment[@]}" \
    data.path="${DATA}" data.tokenizer="${HF_TOKENIZER}" \
    checkpoint.save="${CKPT_DIR}" checkpoint.load="${load}" \
    checkpoint.save_interval="${SAVE_INTERVAL:-100}" logging.output_dir="${OUT_DIR}" \
    "$@" &
  local rc=0
  longpo_wait $! || rc=$?
  longpo_finish "${rc}"
}
