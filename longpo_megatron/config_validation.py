"""Start-up validation: refuse a bad config before any process group exists.

:func:`validate_config` checks a typed :class:`~longpo_megatron.config.Config` against the
launched world size and the machine, and returns the :class:`ResolvedLayout` every later stage
uses (``auto`` values resolved). Every refusal is a :class:`ConfigError` whose message names the
key(s), the value(s) and the rule that was broken.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

from longpo_megatron.config import Config
from longpo_megatron.errors import UserError

BYTE_TOKENIZER_VOCAB = 264
"""Vocabulary of the project byte tokenizer (``data.tokenizer=byte``)."""

ALLOWED: dict[str, tuple[Any, ...]] = {
    "model.family": ("llama", "mistral", "qwen2"),
    "model.attention_backend": ("auto", "local", "flex", "te"),
    "model.recompute": ("none", "selective", "full"),
    "model.rope_scaling": ("none", "llama3", "yarn"),
    "model.reference_rope_scaling": (None, "none", "llama3", "yarn"),
    "parallel.cp_comm_type": ("p2p", "a2a", "all_gather"),
    "parallel.engine": ("auto", "cpu", "gpu"),
    "parallel.distributed_backend": (None, "nccl", "gloo"),
    "longpo.loss": ("longpo", "dpo", "sft", "sft_kl"),
    "longpo.preference_loss": ("sigmoid", "ipo", "hinge"),
    "longpo.nll_scope": ("full", "responses"),
    "reference.mode": ("initial_policy", "online", "precomputed"),
    "optim.lr_decay_style": ("cosine", "constant", "linear"),
    "data.over_length_policy": ("error", "skip"),
    "train.precision": ("auto", "fp32", "bf16"),
}
"""Allowed values of every enum-like key."""

POSITIVE = (
    "model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
    "model.num_attention_heads", "model.num_query_groups", "model.kv_channels",
    "model.vocab_size", "model.max_position_embeddings", "model.rotary_base",
    "model.reference_rotary_base", "model.norm_epsilon", "model.init_method_std",
    "model.rope_scaling_factor", "model.rope_original_max_position_embeddings",
    "model.rope_low_freq_factor", "model.rope_high_freq_factor", "model.yarn_beta_fast",
    "model.yarn_beta_slow",
    "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
    "parallel.context_parallel_size", "parallel.data_parallel_size", "parallel.timeout_minutes",
    "longpo.beta", "longpo.logits_chunk_size", "reference.micro_batch_size",
    "optim.lr", "optim.adam_eps", "data.max_seq_length", "data.max_ref_seq_length",
    "data.preprocess_workers",
    "train.train_iters", "train.micro_batch_size", "train.global_batch_size",
    "train.gradient_accumulation_steps", "train.log_interval", "checkpoint.keep_last",
    "train.exit_duration_minutes", "logging.peak_tflops", "train.max_nonfinite_steps",
)  # fmt: skip
"""Keys that must be > 0 (null is allowed where the schema is Optional)."""

NON_NEGATIVE = (
    "longpo.lam", "optim.min_lr", "optim.weight_decay", "optim.clip_grad",
    "train.seed", "train.eval_interval", "checkpoint.save_interval",
    "checkpoint.save_interval_minutes", "train.exit_margin_minutes", "train.valid_interval",
)  # fmt: skip
"""Keys that must be >= 0."""

UNIT_INTERVAL = (
    "optim.warmup_fraction", "optim.adam_beta1", "optim.adam_beta2", "data.validation_fraction",
)  # fmt: skip
"""Keys that must lie in [0, 1)."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key, the value and the rule."""


@dataclass(frozen=True)
class ResolvedLayout:
    """The run layout after validation, with every ``auto``/null resolved."""

    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    cp: int
    """Context-parallel size."""
    dp: int
    """Data-parallel size (derived from the world size when configured as null)."""
    grad_accum: int
    """Micro-batches per optimizer step per DP rank."""
    seq_multiple: int
    """Every padded sequence length is a multiple of this (2·CP when CP>1, x TP with SP)."""
    engine: str
    """cpu | gpu"""
    sequence_parallel: bool
    """Megatron sequence parallelism inside TP regions."""
    precision: str
    """fp32 | bf16"""
    attention_backend: str
    """local | flex | te"""

    @property
    def world_size(self) -> int:
        """TP·PP·CP·DP."""
        return self.tp * self.pp * self.cp * self.dp


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def te_available() -> bool:
    """Whether TransformerEngine can be imported (a module-level hook tests can patch)."""
    return importlib.util.find_spec("transformer_engine") is not None


def triton_available() -> bool:
    """Whether Triton (what compiled FlexAttention runs on CUDA) can be imported (a hook tests
    can patch)."""
    return importlib.util.find_spec("triton") is not None


def _check_enums(cfg: Config) -> None:
    for key, allowed in ALLOWED.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: must be one of {list(allowed)}")


def _check_finite(cfg: Config) -> None:
    """Every float key is a finite number (``inf`` passes ``> 0`` and ``nan`` every ``not``)."""
    for section in dataclasses.fields(cfg):
        group = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(group):
            continue
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{section.name}.{f.name}={value!r}: must be a finite number (not inf or nan)"
                )


def check_dataset_size(num_pairs: int, cfg: Config) -> None:
    """Refuse a data set smaller than one global batch: every step would hold the same pairs
    several times (1 record with global batch 8 = the same pair 8 times per step)."""
    gbs = cfg.train.global_batch_size
    if num_pairs < gbs:
        raise ConfigError(
            f"data.path={cfg.data.path!r} holds {num_pairs} usable pair(s) but "
            f"train.global_batch_size={gbs}: each step would repeat pairs within one batch; "
            f"use at least {gbs} records or lower train.global_batch_size"
        )


def _check_ranges(cfg: Config) -> None:
    _check_finite(cfg)
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"{key}={value!r}: must be > 0")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        if not value >= 0:
            raise ConfigError(f"{key}={value!r}: must be >= 0")
    for key in UNIT_INTERVAL:
        value = _get(cfg, key)
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value!r}: must satisfy 0 <= {key} < 1")
    o = cfg.optim
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr!r} > optim.lr={o.lr!r}: min_lr must be <= lr")


def _resolve_engine(cfg: Config, cuda_available: bool) -> str:
    engine = cfg.parallel.engine
    if engine == "gpu" and not cuda_available:
        raise ConfigError(
            "parallel.engine='gpu' but CUDA is not available: the gpu engine needs a CUDA "
            "device (use parallel.engine=cpu or auto)"
        )
    if engine == "auto":
        return "gpu" if cuda_available else "cpu"
    return engine


def _resolve_attention(cfg: Config, engine: str, cuda_available: bool) -> str:
    backend = cfg.model.attention_backend
    cp = cfg.parallel.context_parallel_size
    if backend == "flex":
        return _flex_attention(engine, "model.attention_backend='flex'")
    if cfg.data.shared_prefix:
        return _shared_prefix_attention(backend, engine)
    if backend == "te":
        if engine != "gpu":
            why = "CUDA is not available" if not cuda_available else "parallel.engine is 'cpu'"
            raise ConfigError(
                f"model.attention_backend='te' (context_parallel_size={cp}) but {why}: "
                "TransformerEngine attention runs only on the gpu engine with CUDA "
                "(use model.attention_backend=local or auto)"
            )
        if not te_available():
            raise ConfigError(
                "model.attention_backend='te' but transformer_engine is not importable: "
                "install it (pip install -e .[gpu]) or use model.attention_backend=local"
            )
        return "te"
    if backend == "auto":
        return "te" if engine == "gpu" and te_available() else "local"
    return backend


def _flex_attention(engine: str, what: str) -> str:
    """FlexAttention is compiled to Triton kernels on the gpu engine (eager on cpu)."""
    if engine == "gpu" and not triton_available():
        raise ConfigError(
            f"{what} runs FlexAttention on the gpu engine but triton is not importable: "
            "torch.compile(flex_attention) needs it (install the CUDA torch wheel, which "
            "brings triton)"
        )
    return "flex"


def _shared_prefix_attention(backend: str, engine: str) -> str:
    """data.shared_prefix needs the branch mask, which only the project attention reads:
    FlexAttention on the gpu engine under ``auto``, the local attention otherwise."""
    if backend == "te":
        raise ConfigError(
            "data.shared_prefix=true with model.attention_backend='te': TransformerEngine "
            "attention cannot read the packed layout's branch mask; use "
            "model.attention_backend=flex (FlexAttention, the GPU path for packed rows), "
            "local or auto, or data.shared_prefix=false"
        )
    what = f"data.shared_prefix=true with model.attention_backend={backend!r}"
    if backend == "auto":
        return _flex_attention(engine, what) if engine == "gpu" else "local"
    if engine == "gpu":  # local: packed rows on CUDA run FlexAttention too
        _flex_attention(engine, what)
    return backend


def _resolve_precision(cfg: Config, engine: str, cuda_available: bool) -> str:
    precision = cfg.train.precision
    if precision == "auto":
        return "bf16" if engine == "gpu" else "fp32"
    if precision == "bf16" and engine != "gpu":
        why = "CUDA is not available" if not cuda_available else "parallel.engine is 'cpu'"
        raise ConfigError(
            f"train.precision='bf16' on the cpu engine ({why}): bf16 training needs the gpu "
            "engine with CUDA (use train.precision=fp32 or auto)"
        )
    return precision


def _resolve_sequence_parallel(cfg: Config, engine: str, attention: str) -> bool:
    sp, tp = cfg.parallel.sequence_parallel, cfg.parallel.tensor_model_parallel_size
    if sp is None:
        return engine == "gpu" and tp > 1 and attention == "te"
    if sp and engine != "gpu":
        raise ConfigError(
            "parallel.sequence_parallel=True on the cpu engine: megatron's sequence parallel "
            "needs CUDA and the gpu engine (set parallel.sequence_parallel=false or null)"
        )
    if sp and tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=True with parallel.tensor_model_parallel_size=1: "
            "sequence parallelism needs tensor parallelism (TP > 1)"
        )
    if sp and attention != "te":
        raise ConfigError(
            f"parallel.sequence_parallel=True with model.attention_backend resolved to "
            f"{attention!r}: sequence parallelism needs the TransformerEngine spec (megatron's "
            "torch norms refuse it); use model.attention_backend=te or sequence_parallel=false"
        )
    return bool(sp)


def _check_backend(cfg: Config, engine: str) -> None:
    backend = cfg.parallel.distributed_backend
    if backend == "nccl" and engine != "gpu":
        raise ConfigError(
            "parallel.distributed_backend='nccl' on the cpu engine: nccl needs CUDA tensors "
            "(use gloo or null)"
        )
    if backend == "gloo" and engine == "gpu":
        raise ConfigError(
            "parallel.distributed_backend='gloo' on the gpu engine: megatron's collectives "
            "need nccl (use nccl or null)"
        )


def _model_sizes(cfg: Config) -> tuple[int, int, int]:
    p = cfg.parallel
    return p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size


def _resolve_dp(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    tp, pp, cp = _model_sizes(cfg)
    model_ranks = tp * pp * cp
    names = (
        "parallel.tensor_model_parallel_size*parallel.pipeline_model_parallel_size"
        "*parallel.context_parallel_size"
    )
    if p.data_parallel_size is None:
        if world_size % model_ranks:
            raise ConfigError(
                f"world size {world_size} is not divisible by {names} = "
                f"{tp}*{pp}*{cp} = {model_ranks}: world = TP*PP*CP*DP must hold exactly "
                "(parallel.data_parallel_size=null derives DP)"
            )
        return world_size // model_ranks
    dp = p.data_parallel_size
    if model_ranks * dp != world_size:
        raise ConfigError(
            f"world size {world_size} != {names}*parallel.data_parallel_size = "
            f"{tp}*{pp}*{cp}*{dp} = {model_ranks * dp}: world = TP*PP*CP*DP must hold exactly"
        )
    return dp


def _check_model_sharding(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads % groups:
        raise ConfigError(
            f"model.num_query_groups={groups} does not divide model.num_attention_heads={heads}: "
            "GQA needs whole query heads per key/value group"
        )
    for key, value in (("num_attention_heads", heads), ("num_query_groups", groups),
                       ("vocab_size", m.vocab_size)):  # fmt: skip
        if value % tp:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size={tp} does not divide model.{key}={value}: "
                f"TP must divide model.{key} (each TP rank holds an equal shard)"
            )
    if pp > m.num_layers or m.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} does not divide model.num_layers="
            f"{m.num_layers}: PP <= num_layers and PP must divide num_layers (equal stages)"
        )
    if m.kv_channels is None and m.hidden_size % heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{heads} and model.kv_channels is null: set kv_channels or make them divide"
        )
    if m.tie_word_embeddings and pp > 1:
        raise ConfigError(
            f"model.tie_word_embeddings=True with parallel.pipeline_model_parallel_size={pp}: "
            "tied embeddings across pipeline stages are not supported yet (untie them or PP=1)"
        )


def sequence_multiple(tp: int, cp: int, sequence_parallel: bool) -> int:
    """Padded sequence lengths must divide into 2·CP load-balanced chunks (CP>1), each of which
    sequence parallelism splits again over TP."""
    multiple = 2 * cp if cp > 1 else 1
    return multiple * tp if sequence_parallel else multiple


def _check_data(cfg: Config, layout_multiple: int, tp: int, cp: int, sp: bool) -> None:
    d, m = cfg.data, cfg.model
    if d.max_seq_length % layout_multiple:
        parts = [f"2*CP = 2*{cp}"] if cp > 1 else []
        parts += [f"TP = {tp} (sequence parallel on)"] if sp else []
        raise ConfigError(
            f"data.max_seq_length={d.max_seq_length} is not divisible by the layout's sequence "
            f"multiple {layout_multiple} = {' x '.join(parts)} (parallel.context_parallel_size="
            f"{cp}, parallel.tensor_model_parallel_size={tp}): each sequence is split into 2*CP "
            "load-balanced chunks, each split again over TP under sequence parallelism"
        )
    if d.max_seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"data.max_seq_length={d.max_seq_length} > model.max_position_embeddings="
            f"{m.max_position_embeddings}: the model must be built for the longest sequence"
        )
    if d.cache_dir and os.path.isfile(d.cache_dir):
        raise ConfigError(
            f"data.cache_dir={d.cache_dir!r} is a file: it must be a directory (or not exist yet)"
        )
    if d.tokenizer == "byte" and m.vocab_size < BYTE_TOKENIZER_VOCAB:
        raise ConfigError(
            f"data.tokenizer='byte' needs model.vocab_size >= {BYTE_TOKENIZER_VOCAB}, got "
            f"model.vocab_size={m.vocab_size}: the tokenizer does not fit the embedding"
        )


def _check_rope_scaling(cfg: Config) -> None:
    """llama3 / yarn need their anchor length; llama3's frequency band must be non-empty."""
    m = cfg.model
    scalings = {m.rope_scaling, m.reference_rope_scaling or m.rope_scaling} - {"none"}
    if not scalings:
        return
    if m.rope_original_max_position_embeddings is None:
        raise ConfigError(
            f"model.rope_scaling={m.rope_scaling!r} / model.reference_rope_scaling="
            f"{m.reference_rope_scaling!r} needs "
            "model.rope_original_max_position_embeddings (the pre-training context length)"
        )
    if "llama3" in scalings and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(
            f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be > "
            f"model.rope_low_freq_factor={m.rope_low_freq_factor} (llama3 RoPE scaling)"
        )


def _check_reference(cfg: Config) -> None:
    if cfg.reference.mode == "precomputed" and cfg.longpo.loss == "sft_kl":
        raise ConfigError(
            "longpo.loss='sft_kl' with reference.mode='precomputed': the token-level KL needs "
            "per-token reference log-probs, which the store does not keep; use "
            "reference=initial_policy or reference=online"
        )
    if cfg.reference.mode == "precomputed" and not cfg.reference.path:
        raise ConfigError(
            "reference.mode='precomputed' needs reference.path (the JSONL written by "
            "longpo-ref-logps); got reference.path=None"
        )


def _check_validation(cfg: Config) -> None:
    """Held-out validation: one source, reference scores obtainable, an interval only with data."""
    d = cfg.data
    if d.validation_path and d.validation_fraction > 0:
        raise ConfigError(
            f"data.validation_path={d.validation_path!r} and data.validation_fraction="
            f"{d.validation_fraction!r}: set one of them, not both"
        )
    held_out = bool(d.validation_path) or d.validation_fraction > 0
    if held_out and cfg.reference.mode == "precomputed":
        raise ConfigError(
            "validation (data.validation_path / data.validation_fraction) with reference.mode="
            "'precomputed': the store has no reference scores for held-out pairs; use "
            "reference=initial_policy or reference=online"
        )
    if cfg.train.valid_interval > 0 and not held_out:
        raise ConfigError(
            f"train.valid_interval={cfg.train.valid_interval}: no validation set (set "
            "data.validation_path or data.validation_fraction)"
        )


def _resolve_grad_accum(cfg: Config, dp: int) -> int:
    t = cfg.train
    mbs, gbs, ga = t.micro_batch_size, t.global_batch_size, t.gradient_accumulation_steps
    if ga is None:
        if gbs % (mbs * dp):
            raise ConfigError(
                f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size*DP = "
                f"{mbs}*{dp} = {mbs * dp}: gradient accumulation steps must be an integer "
                "(global_batch = micro_batch x grad_accum x DP)"
            )
        return gbs // (mbs * dp)
    if mbs * ga * dp != gbs:
        raise ConfigError(
            f"train.micro_batch_size*gradient_accumulation_steps*DP = {mbs}*{ga}*{dp} = "
            f"{mbs * ga * dp} != train.global_batch_size={gbs}: global_batch = micro_batch x "
            "grad_accum x DP must hold"
        )
    return ga


def validate_config(cfg: Config, world_size: int, cuda_available: bool) -> ResolvedLayout:
    """Check ``cfg`` for a launch of ``world_size`` ranks; resolve and return the layout.

    Call before any process-group work. Raises :class:`ConfigError` on the first broken rule.
    """
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
    _check_enums(cfg)
    _check_ranges(cfg)
    _check_reference(cfg)
    _check_validation(cfg)
    _check_rope_scaling(cfg)
    engine = _resolve_engine(cfg, cuda_available)
    attention = _resolve_attention(cfg, engine, cuda_available)
    precision = _resolve_precision(cfg, engine, cuda_available)
    sp = _resolve_sequence_parallel(cfg, engine, attention)
    _check_backend(cfg, engine)
    _check_model_sharding(cfg)
    dp = _resolve_dp(cfg, world_size)
    p = cfg.parallel
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    multiple = sequence_multiple(tp, cp, sp)
    _check_data(cfg, multiple, tp, cp, sp)
    grad_accum = _resolve_grad_accum(cfg, dp)
    return ResolvedLayout(
        tp=tp,
        pp=p.pipeline_model_parallel_size,
        cp=cp,
        dp=dp,
        grad_accum=grad_accum,
        seq_multiple=multiple,
        engine=engine,
        sequence_parallel=sp,
        precision=precision,
        attention_backend=attention,
    )
