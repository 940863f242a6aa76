"""Fake ``sbatch`` / ``srun`` / ``scontrol`` for running the Slurm scripts on one CPU machine.

* ``srun`` drops its own options and runs the command here (one task), or, with
  ``FAKE_SRUN_RECORD=<file>``, records its argv (and the NCCL variables it was given) instead,
  sleeps ``FAKE_SRUN_SLEEP`` seconds and exits with ``FAKE_SRUN_EXIT``. A ``pkill`` (the USR1
  forwarder) is only logged.
* ``scontrol`` answers ``show hostnames`` with ``localhost`` and logs ``requeue``.
* ``sbatch`` runs the job synchronously (array tasks one after another), with the job's output
  in ``$FAKE_SLURM_DIR/job-<id>.out``, skips a job whose ``afterok`` dependency did not succeed,
  and prints the job id (``--parsable`` or not).
"""

from __future__ import annotations

import sys
from pathlib import Path

SRUN = r"""#!/usr/bin/env bash
log="${FAKE_SLURM_DIR}/events"
case " $* " in *" pkill "*) echo "signal $*" >> "$log"; exit 0;; esac
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
if [[ -n "${FAKE_SRUN_RECORD:-}" ]]; then
  printf '%s\n' "$@" > "${FAKE_SRUN_RECORD}"
  env | grep -E '^(NCCL_|FI_|UCX_)' | sort > "${FAKE_SRUN_RECORD}.env" || true
  echo step-start >> "$log"
  sleep "${FAKE_SRUN_SLEEP:-0}"
  echo step-end >> "$log"
  exit "${FAKE_SRUN_EXIT:-0}"
fi
exec "$@"
"""

SCONTROL = r"""#!/usr/bin/env bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "${FAKE_SLURM_DIR}/events" ;;
  *) exit 1 ;;
esac
"""

SBATCH = r"""#!/usr/bin/env bash
state="${FAKE_SLURM_DIR}"
array="" deps=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --array=*) array="${1#--array=}" ;;
    --dependency=afterok:*) deps="${1#--dependency=afterok:}" ;;
  esac
  shift
done
script="$1"
shift
id="$(cat "${state}/next" 2>/dev/null || echo 100)"
echo $((id + 1)) > "${state}/next"
echo "${id} $(basename "${script}") $*" >> "${state}/submitted"
for d in ${deps//:/ }; do
  if [[ ! -e "${state}/ok.${d}" ]]; then echo "${id}"; exit 0; fi
done
name="$(sed -n 's/^#SBATCH --job-name=//p' "${script}")"
run() {
  SLURM_JOB_ID="${id}" SLURM_JOB_NAME="${name}" SLURM_SUBMIT_DIR="${PWD}" SLURM_NNODES=1 \
    SLURM_JOB_NODELIST=localhost SLURM_CPUS_PER_TASK=1 bash "${script}" "$@" \
    >> "${state}/job-${id}.out" 2>&1
}
ok=1
if [[ -n "${array}" ]]; then
  for task in $(seq "${array%-*}" "${array#*-}"); do
    SLURM_ARRAY_TASK_ID="${task}" SLURM_ARRAY_TASK_COUNT=$(( ${array#*-} - ${array%-*} + 1 )) \
      run "$@" || ok=0
  done
else
  run "$@" || ok=0
fi
if [[ "${ok}" == 1 ]]; then touch "${state}/ok.${id}"; fi
echo "${id}"
"""


def install(tmp: Path) -> dict[str, str]:
    """Write the fakes under ``tmp/bin``; the environment of a job on one local node."""
    bin_dir, state = tmp / "bin", tmp / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("sbatch", SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    python_dir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin",
        "HOME": str(tmp),
        "FAKE_SLURM_DIR": str(state),
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "longpo-test",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_CPUS_PER_TASK": "1",
        "RUNS_ROOT": str(tmp / "runs"),
        "OMP_NUM_THREADS": "1",
    }


def events(env: dict[str, str]) -> list[str]:
    """What the fake srun / scontrol logged, in order."""
    path = Path(env["FAKE_SLURM_DIR"]) / "events"
    return path.read_text().splitlines() if path.exists() else []
