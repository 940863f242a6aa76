"""The demo's results: the comparison table, the plot and ``summary.json``.

Numbers come only from the files the stages wrote (``eval/<name>/results.json`` of
``longpo-eval``, ``train/<method>/metrics.jsonl`` of the trainer, ``datagen/report.json``); none
is written in. Accuracy of a model at a length is the mean over the evaluated tasks of each task's
sample-weighted accuracy over depths (the ``summary`` of a result file).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from longpo_megatron.demo.stages import StageRunner
from longpo_megatron.errors import UserError
from longpo_megatron.eval.report import compare_table, load_results, write_results

SUMMARY_FORMAT = "longpo-demo/1"
"""``format`` of summary.json (bumped when its layout changes)."""
MODELS = ("base", "sft", "dpo", "longpo")
"""Rows of the table, in order."""
LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO", "longpo": "LongPO"}
TRAIN_KEYS = ("loss", "nll", "preference_loss", "rewards/accuracy", "rewards/margins")
"""Metrics of the last logged training step kept in summary.json (those a run logged)."""


class DemoReportError(UserError, ValueError):
    """A stage output the report needs is missing or malformed (the message names the file)."""


def accuracy_by_length(result: dict[str, Any]) -> dict[int, float]:
    """Mean over tasks of the result's per-task accuracy, per length."""
    per_length: dict[int, list[float]] = {}
    for by_length in result["summary"].values():
        for length, acc in by_length.items():
            per_length.setdefault(int(length), []).append(float(acc))
    return {n: sum(v) / len(v) for n, v in sorted(per_length.items())}


def table_text(accuracy: dict[str, dict[int, float]], metric: str) -> str:
    """Markdown table: one row per model, one column per length, and the change from base."""
    lengths = sorted(next(iter(accuracy.values())))
    head = ["model", *(f"{n} tokens" for n in lengths), *(f"Δ{n} vs base" for n in lengths)]
    rows = [head, ["---"] + ["---:"] * (2 * len(lengths))]
    base = accuracy["base"]
    for name, acc in accuracy.items():
        deltas = ["" if name == "base" else f"{100 * (acc[n] - base[n]):+.1f}" for n in lengths]
        rows.append([LABELS.get(name, name), *(f"{100 * acc[n]:.1f}" for n in lengths), *deltas])
    title = f"{metric} accuracy (%), mean over tasks and depths"
    return title + "\n\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot(accuracy: dict[str, dict[int, float]], path: Path, title: str) -> Path:
    """Grouped bars: accuracy of each model at each length (Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths = sorted(next(iter(accuracy.values())))
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(accuracy)
    for i, (name, acc) in enumerate(accuracy.items()):
        xs = [j + (i - (len(accuracy) - 1) / 2) * width for j in range(len(lengths))]
        bars = ax.bar(xs, [100 * acc[n] for n in lengths], width, label=LABELS.get(name, name))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{n} tokens" for n in lengths])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def last_metrics(path: Path) -> dict[str, float]:
    """The TRAIN_KEYS of the last line of a run's metrics.jsonl (and its step)."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        last = json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as e:
        raise DemoReportError(f"{path}: no training metrics to report ({e})") from None
    return {k: last[k] for k in ("step", *TRAIN_KEYS) if k in last}


def machine() -> dict[str, Any]:
    """What the run was measured on."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def write_report(
    out: Path, facts: dict[str, Any], runner: StageRunner, clock: float
) -> dict[str, Any]:
    """Print and save the table, plot and summary.json from the stages' outputs."""
    results = {m: load_results(out / "eval" / m / "results.json") for m in MODELS}
    metric = results["base"]["metric"]
    accuracy = {m: accuracy_by_length(r) for m, r in results.items()}
    table = table_text(accuracy, metric)
    detail = compare_table([results[m] for m in MODELS])
    (out / "table.md").write_text(table + "\n\nPer task:\n\n" + detail + "\n")
    lengths = facts["lengths"]
    title = f"{metric} accuracy: short ({lengths['short']}) vs long ({lengths['long']} tokens)"
    plot(accuracy, out / "accuracy.png", title)
    datagen = json.loads((out / "datagen" / "report.json").read_text())
    summary = {
        "format": SUMMARY_FORMAT,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "metric": metric,
        "accuracy": {m: {str(n): v for n, v in a.items()} for m, a in accuracy.items()},
        "per_task": {m: r["summary"] for m, r in results.items()},
        "training": {m: last_metrics(out / "train" / m / "metrics.jsonl") for m in MODELS[1:]},
        "datagen": datagen,
        "stage_seconds": dict(runner.times),
        "demo_seconds": round(time.monotonic() - clock, 1),
        "artifacts": {
            "table": "table.md",
            "plot": "accuracy.png",
            "longpo_hf": "hf/longpo",
            "eval": {m: f"eval/{m}/results.json" for m in MODELS},
        },
        **{k: v for k, v in facts.items() if k != "demo_seconds"},
    }
    write_results(summary, out / "summary.json")
    print("\n" + table + "\n", flush=True)
    print(f"wrote {out / 'table.md'}, {out / 'accuracy.png'}, {out / 'summary.json'}", flush=True)
    print(f"LongPO model (HF): {out / 'hf' / 'longpo'}", flush=True)
    return summary
