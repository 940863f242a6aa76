"""Result files, console tables, the accuracy heat-map and before/after comparisons."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longpo_megatron.errors import UserError

FORMAT = "longpo-eval/1"
REQUIRED = ("format", "name", "metric", "cells")
CELL_KEYS = ("task", "length", "depth", "n", "accuracy")


class ResultFileError(UserError, ValueError):
    """A result file that cannot be read or compared; the message names the file and key."""


def write_results(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as indented JSON (atomically: a temp file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and check one result file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ResultFileError(f"{p}: cannot read the result file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ResultFileError(f"{p}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ResultFileError(f"{p}: expected a JSON object from longpo-eval")
    for key in REQUIRED:
        if key not in data:
            raise ResultFileError(f"{p}: missing key {key!r} (not a longpo-eval result file?)")
    if data["format"] != FORMAT:
        raise ResultFileError(f"{p}: format {data['format']!r}; this code reads {FORMAT!r}")
    for i, cell in enumerate(data["cells"]):
        missing = [k for k in CELL_KEYS if k not in cell]
        if missing:
            raise ResultFileError(f"{p}: cells[{i}] lacks key(s) {missing}")
        if data["metric"] not in cell["accuracy"]:
            raise ResultFileError(f"{p}: cells[{i}].accuracy has no {data['metric']!r} entry")
    return data


def _per_task_length(result: dict[str, Any]) -> dict[tuple[str, int], float]:
    """Sample-weighted accuracy of the result's metric per (task, length)."""
    acc: dict[tuple[str, int], list[float]] = {}
    for c in result["cells"]:
        entry = acc.setdefault((c["task"], int(c["length"])), [0.0, 0.0])
        entry[0] += c["accuracy"][result["metric"]] * c["n"]
        entry[1] += c["n"]
    return {k: s / n for k, (s, n) in acc.items()}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def console_table(result: dict[str, Any]) -> str:
    """Tasks x lengths, accuracy (%) of the result's metric averaged over depths."""
    table = _per_task_length(result)
    lengths = sorted({n for _, n in table})
    tasks = sorted({t for t, _ in table})
    rows = []
    for task in tasks:
        vals = [table.get((task, n)) for n in lengths]
        known = [v for v in vals if v is not None]
        rows.append([task, *map(_pct, vals), _pct(sum(known) / len(known))])
    means = [[table[(t, n)] for t in tasks if (t, n) in table] for n in lengths]
    overall = [v for col in means for v in col]
    rows.append(
        ["average", *(_pct(sum(c) / len(c)) for c in means), _pct(sum(overall) / len(overall))]
    )
    title = f"{result['name']}: {result['metric']} accuracy (%), mean over depths"
    return title + "\n" + _render(["task", *map(str, lengths), "avg"], rows)


def compare_table(results: Sequence[dict[str, Any]]) -> str:
    """Per (task, length): each run's accuracy and the change from the first to the last."""
    metrics = {r["metric"] for r in results}
    if len(metrics) != 1:
        raise ResultFileError(f"compare: the result files use different metrics {sorted(metrics)}")
    tables = [_per_task_length(r) for r in results]
    keys = sorted(set().union(*tables))
    rows = []
    for task, length in keys:
        vals = [t.get((task, length)) for t in tables]
        delta = "-" if None in (vals[0], vals[-1]) else f"{100 * (vals[-1] - vals[0]):+.1f}"
        rows.append([task, str(length), *map(_pct, vals), delta])
    names = [r["name"] for r in results]
    header = ["task", "length", *names, f"{names[-1]} - {names[0]}"]
    return f"{metrics.pop()} accuracy (%)\n" + _render(header, rows)


def heatmap(result: dict[str, Any], path: str | Path) -> Path:
    """PNG: per task, accuracy by depth (rows) and length (columns); Agg canvas, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, cells = result["metric"], result["cells"]
    tasks = sorted({c["task"] for c in cells})
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    image = None
    for ax, task in zip(axes, tasks):
        mine = [c for c in cells if c["task"] == task]
        lengths = sorted({c["length"] for c in mine})
        depths = sorted({c["depth"] for c in mine}, key=lambda d: -1.0 if d is None else d)
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in mine:
            grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"][metric]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, _pct(v), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
        ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:g}" for d in depths])
        ax.set_title(task)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("depth")
    fig.colorbar(image, ax=axes, label=f"{metric} accuracy")
    fig.suptitle(f"{result['name']} ({result.get('mode', '?')})")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
