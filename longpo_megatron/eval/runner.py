"""The evaluation loop: generate the grid of samples, ask the model, score, aggregate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tqdm import tqdm

from longpo_megatron.eval.backends import Evaluator
from longpo_megatron.eval.config import EvalConfig, default_metric
from longpo_megatron.eval.render import choice_rows, prompt_ids, template_overhead, token_counter
from longpo_megatron.eval.scoring import aggregate, score_choices, score_output, summary
from longpo_megatron.eval.tasks import Sample, generate, grid

RESULT_FORMAT = "longpo-eval/1"
"""``format`` of a result file (bumped when its layout changes)."""
CHUNK = 16
"""Samples handed to the model at once (progress granularity)."""


def build_samples(cfg: EvalConfig, tokenizer: Any) -> list[Sample]:
    """Every sample of the configured grid; a cell's prompts are ``length`` tokens long
    (the chat template's own tokens included)."""
    count = token_counter(tokenizer)
    overhead = template_overhead(tokenizer)
    samples = []
    for task, length, depth in grid(list(cfg.tasks), list(cfg.lengths), list(cfg.depths)):
        for i in range(cfg.samples):
            s = generate(task, length - overhead, depth, i, cfg.seed, count, cfg.options)
            samples.append(dataclasses.replace(s, length=length))
    return samples


def _record(s: Sample, prompt_tokens: int, scores: dict[str, float], **extra: Any) -> dict:
    return {
        "task": s.task,
        "length": s.length,
        "depth": s.depth,
        "index": s.index,
        "prompt_tokens": prompt_tokens,
        "answers": list(s.answers),
        "scores": scores,
        **extra,
    }


def score_samples(
    cfg: EvalConfig, evaluator: Evaluator, samples: list[Sample], progress: bool = True
) -> list[dict[str, Any]]:
    """Ask the model about every sample and score its answers (mode generate or loglik)."""
    tok = evaluator.tokenizer
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(samples), desc=f"eval ({cfg.mode})", unit="sample", disable=not progress)
    for lo in range(0, len(samples), CHUNK):
        part = samples[lo : lo + CHUNK]
        lengths = [len(prompt_ids(tok, s.prompt)) for s in part]
        if cfg.mode == "generate":
            outputs = evaluator.generate([s.prompt for s in part], cfg.max_new_tokens)
            for s, n, out in zip(part, lengths, outputs):
                records.append(_record(s, n, score_output(s, out), output=out))
        else:
            rows = [choice_rows(tok, s) for s in part]
            flat = evaluator.loglik([r for rs in rows for r in rs])
            at = 0
            for s, n, rs in zip(part, lengths, rows):
                got = flat[at : at + len(rs)]
                at += len(rs)
                logps = [lp for lp, _ in got]
                scores = score_choices(s, logps, got[s.label][1])
                records.append(
                    _record(s, n, scores, choices=list(s.choices), label=s.label, logps=logps)
                )
        bar.update(len(part))
    bar.close()
    return records


def evaluate(cfg: EvalConfig, evaluator: Evaluator, progress: bool = True) -> dict[str, Any]:
    """The whole evaluation as a result dict (what ``results.json`` holds)."""
    samples = build_samples(cfg, evaluator.tokenizer)
    records = score_samples(cfg, evaluator, samples, progress)
    metric = default_metric(cfg)
    cells = aggregate(records)
    config = dataclasses.asdict(cfg)
    config.pop("defaults", None)
    return {
        "format": RESULT_FORMAT,
        "name": cfg.name or Path(str(cfg.model)).resolve().name,
        "model": evaluator.describe(),
        "mode": cfg.mode,
        "metric": metric,
        "config": config,
        "cells": cells,
        "summary": summary(cells, metric),
        "samples": records if cfg.save_samples else [],
    }
