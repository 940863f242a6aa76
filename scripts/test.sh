#!/usr/bin/env bash
# Set up (idempotent) and run the whole default test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LONGPO_ROOT="$PWD" PYTHONFAULTHANDLER=1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
