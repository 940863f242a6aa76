#!/usr/bin/env bash
# longpo-datagen on the bundled corpus with a tiny random model, on CPU (about a minute).
# Its text is noise, so no records come out: the point is to watch the stages, the progress
# bars and the report counting every chunk that failed question parsing. Rerun: it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LONGPO_ROOT="$PWD"
MODEL=${MODEL:-outputs/tiny-datagen-model}
[ -f "$MODEL/config.json" ] || .venv/bin/python -m longpo_megatron.datagen.tiny_model "$MODEL"
.venv/bin/python -m longpo_megatron.datagen.cli preset=demo backend.model="$MODEL" "$@"
echo "report: outputs/datagen-demo/shard-00000-of-00001/report.json"
