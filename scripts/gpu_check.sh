#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md): on a lent CUDA device, install what the image lacks
# from the carried wheel folder, run the GPU test tier and the GPU benchmark, write everything to
# $OUT, all inside a time budget. Without CUDA it says so and exits 0.
#
#   bash scripts/gpu_check.sh          (the device `run` call: carry=[".whl"]; see docs/gpu.md)
#
# Environment (all optional):
#   OUT                   where results go (default outputs/gpu-check)
#   PYTHON                interpreter with torch (default python3)
#   GPU_CHECK_BUDGET_S    the whole check's wall-clock budget in seconds (default 480 = 8 min)
#   GPU_CHECK_BENCH_S     seconds kept for the benchmark when the tests start (default 210)
#   GPU_CHECK_MIN_PART_S  a part starts only with at least this many seconds left (default 30)
#   GPU_CHECK_TEST_TIMEOUT_S  one test's limit (pytest-timeout; default 150): a hang costs no more
#   GPU_CHECK_PARTS       parts to run, in order (default "tests bench"; "" = install only)
#   GPU_CHECK_TESTS       the pytest targets of the tests part (default tests/test_gpu.py)
#   WHEEL_DIR             the carried wheels (default .whl, filled by scripts/fetch_gpu_wheels.sh)
#   GPU_CHECK_SITE        where the wheels are installed (default /tmp/longpo-site)
#   GPU_CHECK_WHEELS      dist==version:module of each carried wheel (default: the four below)
#   GPU_CHECK_FAKE_CUDA   tests of this script only: 0 = act as if there were no CUDA device,
#                         1 = act as if there were one (benchmark at --cpu-smoke sizes)
#
# Exit status: 0 all that ran passed (or no CUDA device); 1 a test or the benchmark failed;
# 2 no usable Python/torch; 3 the carried wheels are missing or wrong; 4 stopped by the budget.
# Files in $OUT: check.log, summary.md, versions.txt, junit-gpu.xml, pytest.log, bench.json,
# bench.md, bench.log (8 files: what the device tool brings back).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/outputs/gpu-check}
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
BENCH_S=${GPU_CHECK_BENCH_S:-210}
MIN_PART_S=${GPU_CHECK_MIN_PART_S:-30}
TEST_TIMEOUT_S=${GPU_CHECK_TEST_TIMEOUT_S:-150}
PARTS=${GPU_CHECK_PARTS-tests bench}
TESTS=${GPU_CHECK_TESTS:-tests/test_gpu.py}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/longpo-site}
WHEELS=${GPU_CHECK_WHEELS:-megatron-core==0.16.1:megatron.core hydra-core==1.3.2:hydra \
omegaconf==2.3.0:omegaconf antlr4-python3-runtime==4.9.3:antlr4}
FAKE=${GPU_CHECK_FAKE_CUDA:-}
DEADLINE=$(($(date +%s) + BUDGET_S))
REPORT=(tools/gpu_check_report.py)

mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
TEE_PID=$!
# at exit, close the pipe and let tee finish writing check.log before the device collects $OUT
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null || true' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:${PYTHONPATH:-}"
say() { echo "gpu_check: $*"; }
left() { echo $((DEADLINE - $(date +%s))); }

# --- 1. is there a CUDA device? -------------------------------------------------------------
probe_cuda() {
  case "$FAKE" in
    0) echo "0 GPU_CHECK_FAKE_CUDA=0: acting as if no CUDA device were present"; return ;;
    1) echo "1 GPU_CHECK_FAKE_CUDA=1: no real GPU; benchmark at --cpu-smoke sizes"; return ;;
  esac
  "$PY" - <<'EOF'
import torch
if not torch.cuda.is_available():
    print(f"0 torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
else:
    p = torch.cuda.get_device_properties(0)
    print(f"1 {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{torch.cuda.device_count()} device(s); torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
}

if ! probe=$(probe_cuda) || [ -z "$probe" ]; then
  say "error: '$PY' cannot import torch; set PYTHON to the interpreter that has torch"
  exit 2
fi
have_cuda=${probe%% *}
DEVICE=${probe#* }
say "device: $DEVICE"
if [ "$have_cuda" != 1 ]; then
  say "no CUDA device here: nothing to check (the GPU tests skip without one). Exit 0."
  printf '# GPU check\n\nno CUDA device: %s\n\nNothing was run.\n' "$DEVICE" >"$OUT/summary.md"
  exit 0
fi

# --- 2. install what the image lacks, from the carried wheels only ---------------------------
install_wheels() {
  local need spec name ver f base wheels=() found
  need=$("$PY" "${REPORT[@]}" missing --wheels "$WHEELS" | tr '\n' ' ') || return 2
  if [ -z "${need// /}" ]; then
    say "all carried packages are already installed: nothing to install"
    return 0
  fi
  if [ ! -d "$WHEEL_DIR" ]; then
    say "error: not installed: $need; no wheel folder '$WHEEL_DIR' was carried." \
      "Run scripts/fetch_gpu_wheels.sh here and pass carry=[\"$WHEEL_DIR\"] to the device run"
    return 3
  fi
  for spec in $need; do
    name=$(echo "${spec%%==*}" | tr 'A-Z-' 'a-z_')
    ver=${spec#*==}
    found=()
    for f in "$WHEEL_DIR"/*.whl; do
      [ -e "$f" ] || continue
      base=${f##*/}
      [[ ${base,,} == "${name}-"* ]] && found+=("$f")
    done
    if [ ${#found[@]} != 1 ] || [[ ${found[0]##*/} != "${name}-${ver}-"* ]]; then
      say "error: $spec is not installed and '$WHEEL_DIR' must hold exactly one ${name}-${ver}-*.whl" \
        "(found: ${found[*]##*/}). Rerun scripts/fetch_gpu_wheels.sh"
      return 3
    fi
    wheels+=("${found[0]}")
  done
  say "installing from $WHEEL_DIR into $SITE (no network): $need"
  PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || { say "error: pip could not install ${wheels[*]}"; return 3; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
}

install_wheels
rc=$?
if [ $rc != 0 ]; then exit $rc; fi
"$PY" "${REPORT[@]}" versions --wheels "$WHEELS" >"$OUT/versions.txt"
versions_ok=$?
cat "$OUT/versions.txt"
if [ $versions_ok != 0 ]; then
  say "error: a carried package has the wrong version after the install (see above)"
  exit 3
fi

# --- 3. the parts, each inside what is left of the budget --------------------------------------
status=0
part_args=()
record() { part_args+=(--part "$1=$2"); say "$1: $2"; }
too_late() { [ "$(left)" -lt "$MIN_PART_S" ]; }

run_tests() {
  local t=$(($(left) - BENCH_S))
  [ "$t" -ge "$MIN_PART_S" ] || t=$(left)
  local per_test=$((t < TEST_TIMEOUT_S ? t : TEST_TIMEOUT_S))
  say "tests: pytest -m gpu, at most $t s (one test at most $per_test s)"
  # shellcheck disable=SC2086 # TESTS may name several targets
  timeout -s INT -k 20 "$t" "$PY" -m pytest -m gpu $TESTS -p no:cacheprovider -v -rA \
    --timeout="$per_test" --junitxml="$OUT/junit-gpu.xml" >"$OUT/pytest.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/pytest.log"
  case $rc in
    0 | 5) record tests "ran (exit $rc)" ;;
    124 | 137 | 2) record tests "STOPPED by the time budget after $t s (exit $rc)"; status=4 ;;
    *) record tests "FAILED (pytest exit $rc)"; status=1 ;;
  esac
}

run_bench() {
  local t=$(($(left) - 10)) smoke=()
  [ "$FAKE" = 1 ] && smoke=(--cpu-smoke)
  say "bench: benchmarks/bench_gpu.py ${smoke[*]}, at most $t s"
  timeout -s INT -k 20 "$t" "$PY" benchmarks/bench_gpu.py "${smoke[@]}" \
    --deadline "$((DEADLINE - 15))" --json "$OUT/bench.json" --table "$OUT/bench.md" \
    >"$OUT/bench.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/bench.log"
  case $rc in
    0) record bench "ran" ;;
    4) record bench "STOPPED early by the deadline (partial table)"; [ $status = 1 ] || status=4 ;;
    124 | 137 | 130) record bench "KILLED at the time budget (exit $rc)"; [ $status = 1 ] || status=4 ;;
    *) record bench "FAILED (exit $rc)"; status=1 ;;
  esac
}

for part in $PARTS; do
  if too_late; then
    record "$part" "NOT STARTED: $(left) s left, a part needs $MIN_PART_S s"
    [ $status = 1 ] || status=4
    continue
  fi
  case $part in
    tests) run_tests ;;
    bench) run_bench ;;
    *) say "error: unknown part '$part' in GPU_CHECK_PARTS (tests, bench)"; exit 2 ;;
  esac
done

"$PY" "${REPORT[@]}" summary --out "$OUT" --device "$DEVICE" --versions "$OUT/versions.txt" \
  "${part_args[@]}"
say "done in $((BUDGET_S - $(left))) s of $BUDGET_S s; exit $status"
exit $status
