#!/usr/bin/env bash
# Download, HERE (where PyPI is reachable), the wheels the GPU device image lacks, into the
# ignored folder .whl/ that scripts/gpu_check.sh installs from there (nothing is reachable there).
#
# The device image (see docs/gpu.md) has Python 3.12, torch (CUDA), transformers, tensorboard,
# safetensors, tqdm, psutil, matplotlib, numpy, pyyaml, packaging and pytest, but NOT
# megatron-core, hydra-core, omegaconf or antlr4-python3-runtime. Those four travel as wheels:
# megatron-core for cp312/manylinux x86_64, the others pure Python (antlr4 4.9.3, the version
# omegaconf 2.3 pins, is published as an sdist only, so it is built into a wheel here).
#
# Usage: bash scripts/fetch_gpu_wheels.sh            (PYTHON=... picks the pip that downloads)
# The carry limit of one device call is 64 MiB for the whole working tree; this script fails
# when the wheels alone exceed WHEEL_BUDGET_MIB (default 48, leaving room for the repository).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}
BUDGET_MIB=${WHEEL_BUDGET_MIB:-48}
MEGATRON=${MEGATRON_VERSION:-0.16.1}
# name==version of every wheel to carry; versions match constraints-cpu.txt / the CPU venv
PURE=("hydra-core==1.3.2" "omegaconf==2.3.0")
ANTLR="antlr4-python3-runtime==4.9.3"

mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done

echo "fetch: megatron-core==$MEGATRON for CPython 3.12 x86_64 -> $DEST/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$DEST" "megatron-core==$MEGATRON"

echo "fetch: ${PURE[*]} (pure Python) -> $DEST/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --platform any -d "$DEST" "${PURE[@]}"

if ! ls "$DEST"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  echo "fetch: $ANTLR is an sdist on PyPI; building a pure-Python wheel from it"
  "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "$ANTLR"
fi

# one version of each project: two wheels of one name stop the install on the device
dupes=$(for f in "$DEST"/*.whl; do f=${f##*/}; echo "${f%%-*}"; done | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "error: $DEST holds several versions of: $dupes (remove the extra wheels)" >&2
  exit 1
fi

echo "fetch: wheels in $DEST/"
total=0
for f in "$DEST"/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  awk -v b="$size" -v n="$(basename "$f")" 'BEGIN { printf "  %8.2f MiB  %s\n", b / 1048576, n }'
done
awk -v b="$total" -v m="$BUDGET_MIB" \
  'BEGIN { printf "  %8.2f MiB  total (budget %d MiB of the 64 MiB carry limit)\n", b / 1048576, m }'
if [ "$total" -gt $((BUDGET_MIB * 1048576)) ]; then
  echo "error: $DEST holds $total bytes, over WHEEL_BUDGET_MIB=$BUDGET_MIB MiB; the device call" \
    "carries at most 64 MiB with the repository" >&2
  exit 1
fi
