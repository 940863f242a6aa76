"""Scoring: exact-match and contains on generated answers, argmax over choices in the
log-likelihood mode, and aggregation per task × length × depth.

Metrics (each a 0/1 per sample; a cell's accuracy is their mean):
- ``contains``: every expected answer occurs in the output (case-insensitive; RULER's metric);
- ``exact``: the output's words are exactly the answers' words (order and punctuation free);
- ``choice``: log-likelihood mode, the correct option has the highest summed log-probability;
- ``greedy``: log-likelihood mode, every token of the correct option (and its end of turn) is
  the argmax given the tokens before it, i.e. greedy decoding would write exactly that answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

from longpo_megatron.eval.tasks import Sample

GENERATE_METRICS = ("contains", "exact")
LOGLIK_METRICS = ("choice", "greedy")
_WORD = re.compile(r"[\w-]+")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, hyphens) of ``text``."""
    return _WORD.findall(text.lower())


def score_output(sample: Sample, output: str) -> dict[str, float]:
    """``contains`` and ``exact`` of one generated answer."""
    low = output.lower()
    contains = all(a.lower() in low for a in sample.answers)
    want = sorted(w for a in sample.answers for w in words(a))
    exact = sorted(words(output)) == want
    return {"contains": float(contains), "exact": float(exact)}


def score_choices(sample: Sample, logps: Sequence[float], greedy_ok: bool) -> dict[str, float]:
    """``choice`` (argmax of the options' log-likelihoods; ties count as wrong) and ``greedy``."""
    if len(logps) != len(sample.choices) or sample.label < 0:
        raise ValueError(f"{sample.task}: {len(logps)} scores for {len(sample.choices)} choices")
    best = max(logps)
    right = logps[sample.label] == best and sum(1 for v in logps if v == best) == 1
    return {"choice": float(right), "greedy": float(greedy_ok)}


def cell_key(task: str, length: int, depth: Optional[float]) -> tuple[str, int, Optional[float]]:
    """The grid cell a sample belongs to."""
    return (task, int(length), None if depth is None else round(float(depth), 6))


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, length, depth): sample count, mean prompt tokens and each metric's accuracy."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(cell_key(r["task"], r["length"], r["depth"]), []).append(r)
    cells = []
    for (task, length, depth), rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        metrics = sorted({m for r in rs for m in r["scores"]})
        cells.append(
            {
                "task": task,
                "length": length,
                "depth": depth,
                "n": len(rs),
                "prompt_tokens": sum(r["prompt_tokens"] for r in rs) / len(rs),
                "accuracy": {m: sum(r["scores"][m] for r in rs) / len(rs) for m in metrics},
            }
        )
    return cells


def _sort_key(key: tuple) -> tuple:
    task, length, depth = key
    return (task, length, -1.0 if depth is None else depth)


def summary(cells: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """Mean ``metric`` accuracy per task and length (over depths, sample-weighted)."""
    out: dict[str, dict[str, list[float]]] = {}
    for c in cells:
        if metric not in c["accuracy"]:
            continue
        acc = out.setdefault(c["task"], {}).setdefault(str(c["length"]), [0.0, 0.0])
        acc[0] += c["accuracy"][metric] * c["n"]
        acc[1] += c["n"]
    return {t: {k: s / n for k, (s, n) in per.items()} for t, per in out.items()}
