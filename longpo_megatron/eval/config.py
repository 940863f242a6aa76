"""Typed configuration of ``longpo-eval`` (Hydra root ``conf/eval/eval.yaml``).

Registered in Hydra's ConfigStore as ``eval_schema``; every key has a docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from longpo_megatron.datagen.config import BackendConfig
from longpo_megatron.eval.backends import EvalConfigError
from longpo_megatron.eval.tasks import TaskOptions, check_task

MODES = ("generate", "loglik")


@dataclass
class MegatronEvalConfig:
    """How a Megatron checkpoint is evaluated (launch with torchrun for TP/PP/CP/DP > 1)."""

    tensor_model_parallel_size: int = 1
    """TP of the evaluation (any saved layout loads into any other)."""
    pipeline_model_parallel_size: int = 1
    """PP of the evaluation."""
    context_parallel_size: int = 1
    """CP of the evaluation (sequences split across ranks as in training)."""
    micro_batch_size: int = 1
    """Rows per forward pass per DP rank."""
    logits_chunk_size: int = 1024
    """Positions per output-layer chunk (bounds logits memory)."""
    model_config: Optional[str] = None
    """A conf/model YAML; null = the model config stored in the checkpoint."""
    tokenizer: Optional[str] = None
    """byte | a local HF tokenizer dir; null = <checkpoint root>/hf (written by the HF converter),
    else the training run's data.tokenizer stored in the checkpoint."""


@dataclass
class EvalConfig:
    """Root of ``longpo-eval``."""

    model: Optional[str] = None
    """An HF model directory (config.json + weights, e.g. what the exporter writes) or a Megatron
    checkpoint (a save directory with `latest`, or an iter_* directory)."""
    mode: str = "generate"
    """generate (greedy answers, exact/contains scoring) | loglik (multiple choice by summed
    log-likelihood of each option, plus the greedy check)."""
    tasks: list[str] = field(
        default_factory=lambda: [
            "niah_single",
            "niah_multikey",
            "niah_multivalue",
            "niah_multiquery",
            "vt",
            "cwe",
            "qa",
        ]
    )
    """Tasks to run (see longpo_megatron/eval/tasks.py)."""
    lengths: list[int] = field(default_factory=lambda: [4096, 8192])
    """Prompt lengths in tokens of the model's tokenizer (chat template included)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle positions as fractions of the context (0 = start, 1 = end)."""
    samples: int = 4
    """Samples per task x length x depth cell."""
    seed: int = 0
    """Every sample is a pure function of (seed, task, length, depth, index)."""
    max_new_tokens: int = 64
    """Longest generated answer (generate mode)."""
    metric: Optional[str] = None
    """Metric of the console table and heat-map: contains | exact (generate) | choice | greedy
    (loglik); null = contains for generate, choice for loglik."""
    output_dir: str = "outputs/eval"
    """Where results.json, results.png (and compare.txt) are written."""
    name: Optional[str] = None
    """Label of this run in tables and comparisons; null = the model directory's name."""
    compare: list[str] = field(default_factory=list)
    """Two or more result files: print a before/after table (no model is loaded)."""
    save_samples: bool = True
    """Keep every sample's answer and scores in the result file."""
    options: TaskOptions = field(default_factory=TaskOptions)
    backend: BackendConfig = field(default_factory=lambda: BackendConfig(model=""))
    """HF directories: the generation backend (hf | vllm), as in longpo-datagen; backend.model is
    taken from ``model``."""
    megatron: MegatronEvalConfig = field(default_factory=MegatronEvalConfig)
    defaults: list[Any] = field(default_factory=list)
    """Hydra defaults list (kept so structured-config validation accepts it)."""


def register_eval_configs() -> None:
    """Register the schema so Hydra type-checks every eval YAML and override."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


def to_eval_config(cfg: Any) -> EvalConfig:
    """A composed DictConfig as a typed :class:`EvalConfig` (unknown keys are an error)."""
    from longpo_megatron.config import to_typed

    try:
        return to_typed(cfg, EvalConfig, "longpo_megatron/eval/config.py")
    except ValueError as e:
        raise EvalConfigError(str(e)) from None


def default_metric(cfg: EvalConfig) -> str:
    """``metric``, or the mode's main metric."""
    return cfg.metric or ("contains" if cfg.mode == "generate" else "choice")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise EvalConfigError(f"{key}={value!r}: {rule}")


def validate_eval_config(cfg: EvalConfig) -> None:
    """Refuse settings that cannot work before any model is loaded."""
    if cfg.compare:
        _check(len(cfg.compare) >= 2, "compare", cfg.compare, "needs two or more result files")
        return
    _check(bool(cfg.model), "model", cfg.model, "set an HF directory or a Megatron checkpoint")
    _check(cfg.mode in MODES, "mode", cfg.mode, f"must be one of {list(MODES)}")
    _check(bool(cfg.tasks), "tasks", cfg.tasks, "must name at least one task")
    for task in cfg.tasks:
        check_task(task)
    _check(bool(cfg.lengths), "lengths", cfg.lengths, "must hold at least one length")
    _check(all(n >= 16 for n in cfg.lengths), "lengths", cfg.lengths, "every length >= 16")
    _check(bool(cfg.depths), "depths", cfg.depths, "must hold at least one depth")
    _check(all(0 <= d <= 1 for d in cfg.depths), "depths", cfg.depths, "must lie in [0, 1]")
    _check(cfg.samples >= 1, "samples", cfg.samples, "must be >= 1")
    _check(cfg.max_new_tokens >= 1, "max_new_tokens", cfg.max_new_tokens, "must be >= 1")
    wanted = ("contains", "exact") if cfg.mode == "generate" else ("choice", "greedy")
    _check(
        cfg.metric in (None, *wanted), "metric", cfg.metric, f"mode={cfg.mode} has {list(wanted)}"
    )
    o = cfg.options
    for key in ("value_digits", "num_keys", "num_values", "num_queries", "vt_hops", "cwe_top_k"):
        _check(getattr(o, key) >= 1, f"options.{key}", getattr(o, key), "must be >= 1")
    _check(o.num_choices >= 2, "options.num_choices", o.num_choices, "must be >= 2")
    _check(o.cwe_common_freq > 3, "options.cwe_common_freq", o.cwe_common_freq, "must be > 3")
    m = cfg.megatron
    for key in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "micro_batch_size",
        "logits_chunk_size",
    ):
        _check(getattr(m, key) >= 1, f"megatron.{key}", getattr(m, key), "must be >= 1")
