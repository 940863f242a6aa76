#!/usr/bin/env python
"""Throughput of longpo-datagen on CPU with the tiny random model on the bundled corpus.

Two runs: (1) every stage with the ``hf`` backend (the random model's questions never parse,
so only the instruction stage generates); (2) questions from a scripted plug-in, chosen and
rejected answers sampled from the ``hf`` backend (its end-of-turn bias makes them stop), so
records come out. Prints requests/s, generated
tokens/s and records/s per stage, and the machine's load average (CPU timings are noisy on a
shared machine).

    python benchmarks/bench_datagen.py [--out outputs/bench-datagen]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "datagen"))
os.environ.setdefault("LONGPO_ROOT", str(ROOT))

from dg_helpers import compose_cfg, corpus_texts  # noqa: E402

from longpo_megatron.datagen.cli import run  # noqa: E402
from longpo_megatron.datagen.tiny_model import make_tiny_model  # noqa: E402


def timed(overrides: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    report = run(compose_cfg(overrides))
    return report, time.perf_counter() - start


def line(name: str, stats: dict) -> str:
    secs = stats.get("seconds_this_run") or 0.0
    toks = stats.get("generated_tokens_this_run", 0)
    rate = f"{toks / secs:.0f}" if secs else "-"
    return (
        f"  {name:12s} {stats.get('requests_this_run', 0):4d} requests in {secs:6.1f} s "
        f"({stats.get('requests_per_s') or 0:.2f} req/s, {rate} generated tok/s)"
    )


def main() -> None:
    """Build the model, run both configurations, print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench-datagen"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    import torch

    torch.set_num_threads(args.threads)
    model = make_tiny_model(out / "model", corpus_texts(), eos_bias=2.5)
    base = [f"backend.model={model}", "preset=demo", "progress=false"]
    sampled = ["chosen.sampling.do_sample=true", "rejected.sampling.do_sample=true"]
    print(f"load average before: {os.getloadavg()}")
    rep, secs = timed([*base, f"output_dir={out}/hf"])
    print(f"(1) hf, all stages: {secs:.1f} s, {rep['documents']['chunks']} chunks")
    print(line("instructions", rep["instructions"]))
    print(f"    chunk outcomes: {rep['instructions']['outcome']}")
    hybrid = [*base, f"output_dir={out}/hybrid"]
    plug = ["backend.name=scripted_backend:make", f"backend.tokenizer={model}"]
    for stage in ("chunk", "instructions"):
        run(compose_cfg([*hybrid, f"stage={stage}", *plug]))
    total = 0.0
    for stage in ("chosen", "rejected", "records"):
        rep, secs = timed([*hybrid, f"stage={stage}", *sampled])
        total += secs
    n = rep["records"]["records"]
    print(f"(2) scripted questions + hf answers: {total:.1f} s, {n} records ({n / total:.3f}/s)")
    print(line("chosen", rep["chosen"]))
    print(line("rejected", rep["rejected"]))
    print(f"    pairs dropped: {rep['records']['pairs_dropped']}")
    print(f"load average after: {os.getloadavg()}")
    (out / "bench.json").write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
