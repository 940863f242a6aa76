"""Structured configuration: one dataclass per Hydra group, registered in Hydra's ConfigStore.

Every field carries a docstring (the string literal under it) so `--help`-style tooling and readers
see what a key means. Validation lives in :mod:`longpo_megatron.config_validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    """Architecture of a Mistral / Llama / Qwen2-family decoder (RMSNorm, SwiGLU, GQA, RoPE)."""

    name: str = "tiny"
    """Human-readable model name (used in logs and exported metadata)."""
    family: str = "llama"
    """Architecture family: llama | mistral | qwen2 (decides HF export naming, QKV bias default)."""
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 160
    """SwiGLU inner width (per gate and per up projection)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int = 2
    """Key/value heads (GQA groups); equal to num_attention_heads means plain MHA."""
    kv_channels: Optional[int] = None
    """Head dimension; null means hidden_size // num_attention_heads."""
    vocab_size: int = 264
    """Vocabulary size of the embedding and output layers (must be divisible by TP)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is built for (RoPE tables are computed on the fly)."""
    rotary_base: float = 10000.0
    """RoPE θ of the POLICY. LongPO raises it (1e7 at 128K) for length extension."""
    reference_rotary_base: Optional[float] = None
    """RoPE θ of the frozen REFERENCE (the original model's θ); null means same as rotary_base."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2 has it; Llama/Mistral do not)."""
    tie_word_embeddings: bool = False
    """Share input embedding and output layer weights (all supported 7B models untie them)."""
    init_method_std: float = 0.02
    """Std of the normal init for random (non-loaded) weights."""
    attention_backend: str = "auto"
    """Core attention: auto (TE on CUDA when importable, else local; with data.shared_prefix:
    flex on CUDA, else local) | local | flex (torch FlexAttention with a block-sparse mask:
    compiled on CUDA, eager on CPU) | te."""
    recompute: str = "none"
    """Activation recomputation: none | selective (core attention) | full (whole layers)."""
    rope_scaling: str = "none"
    """RoPE frequency scaling of BOTH policy and reference: none (plain RoPE) | llama3
    (Llama-3.1's low/high-frequency rescaling) | yarn (YaRN, e.g. Qwen2.5 beyond 32K)."""
    reference_rope_scaling: Optional[str] = None
    """RoPE scaling of the frozen REFERENCE; null = same as rope_scaling. Set none when the
    policy alone is extended by YaRN (the reference stays the original plain-RoPE model)."""
    rope_scaling_factor: float = 1.0
    """llama3 / yarn: the context extension factor (HF ``factor``)."""
    rope_original_max_position_embeddings: Optional[int] = None
    """llama3 / yarn: the pre-training context the scaling is anchored to (HF
    ``original_max_position_embeddings``; Llama-3.1: 8192, Qwen2.5: 32768)."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max / low_freq_factor are divided by the factor."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max / high_freq_factor are left unscaled."""
    yarn_beta_fast: float = 32.0
    """yarn: rotations that bound the extrapolated (unscaled) dimensions."""
    yarn_beta_slow: float = 1.0
    """yarn: rotations that bound the interpolated (fully scaled) dimensions."""
    yarn_mscale: float = 1.0
    """yarn: numerator coefficient of the cos/sin attention factor 0.1·mscale·ln(factor)+1."""
    yarn_mscale_all_dim: float = 0.0
    """yarn: denominator coefficient of the attention factor (0 = denominator 1, HF's default)."""


@dataclass
class ParallelConfig:
    """Process layout. world = TP * PP * CP * DP (megatron order tp-cp-dp-pp)."""

    tensor_model_parallel_size: int = 1
    """TP: shards heads, MLP width and vocabulary across ranks."""
    pipeline_model_parallel_size: int = 1
    """PP: splits layers into consecutive stages; the loss lives on the last stage."""
    context_parallel_size: int = 1
    """CP: splits each sequence into 2*CP load-balanced chunks across ranks."""
    data_parallel_size: Optional[int] = None
    """DP; null derives it as world // (TP*PP*CP) and the product must then be exact."""
    sequence_parallel: Optional[bool] = None
    """Megatron sequence parallelism inside TP regions; null = on for GPU with TP>1, off on CPU."""
    cp_comm_type: str = "p2p"
    """TransformerEngine context-parallel communication: p2p | a2a | all_gather."""
    engine: str = "auto"
    """Training engine: auto (gpu when CUDA is available) | cpu | gpu."""
    distributed_backend: Optional[str] = None
    """torch.distributed backend; null = nccl on GPU, gloo on CPU."""
    timeout_minutes: int = 30
    """Collective timeout before a hung rank errors out."""


@dataclass
class LongPOConfig:
    """The objective: L = NLL(chosen long sequence) + lam * preference(Δ)."""

    loss: str = "longpo"
    """longpo (reference on short prompts) | dpo (reference on the long prompt) | sft (NLL only)
    | sft_kl (NLL + λ·token-level KL to the reference on the short prompt)."""
    preference_loss: str = "sigmoid"
    """Preference term on Δ: sigmoid (-log σ(Δ)) | ipo | hinge."""
    beta: float = 0.01
    """β scaling the log-ratio difference Δ (authors' code: 0.01; paper text: 0.1)."""
    lam: float = 0.01
    """λ weighting the preference term against the NLL term (authors' code: 0.01)."""
    nll_scope: str = "full"
    """Tokens of the chosen long sequence the NLL averages: full (every real token) | responses."""
    logits_chunk_size: int = 1024
    """Positions per output-layer chunk; bounds logits memory to chunk x vocab/TP."""


@dataclass
class ReferenceConfig:
    """Where Σ log π_ref(y|x_S) comes from."""

    mode: str = "initial_policy"
    """initial_policy (score all pairs once at start) | online (a frozen model scores each
    step's pairs) | precomputed (read ``path``; no reference weights are loaded)."""
    micro_batch_size: int = 4
    """Short sequences per forward pass when scoring the reference."""
    load: Optional[str] = None
    """Checkpoint with the reference weights (the initial model); null = the initial policy."""
    path: Optional[str] = None
    """Precomputed reference log-probs (JSONL from ``longpo-ref-logps``): read in mode
    precomputed, written by the CLI."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, global grad-norm clipping."""

    lr: float = 5.0e-7
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.95
    """AdamW β2."""
    adam_eps: float = 1.0e-8
    """AdamW ε."""
    warmup_fraction: float = 0.1
    """Fraction of train.train_iters used for linear warm-up."""
    lr_decay_style: str = "cosine"
    """cosine | constant | linear."""
    clip_grad: float = 1.0
    """Global L2 grad-norm clip (0 disables clipping; the norm is still reported)."""
    use_distributed_optimizer: bool = True
    """GPU engine: shard optimizer state over DP (Megatron distributed optimizer)."""


@dataclass
class DataConfig:
    """Preference records and their tokenization."""

    path: str = "${oc.env:LONGPO_ROOT,.}/data/toy/preference.jsonl"
    """JSONL file of LongPO records (schema in docs/data-format.md), or a prepared dataset
    directory written by ``longpo-preprocess`` (docs/data-format.md, "Prepared datasets")."""
    tokenizer: str = "byte"
    """byte (project byte-level chat tokenizer) | a local HF tokenizer directory."""
    max_seq_length: int = 1024
    """Longest tokenized LONG sequence (document + all turns)."""
    max_ref_seq_length: int = 512
    """Longest tokenized SHORT per-turn reference sequence."""
    over_length_policy: str = "error"
    """A record over a length limit: error (stop, naming it) | skip (count it in the report)."""
    shuffle: bool = True
    """Shuffle record order each epoch (seeded by train.seed)."""
    cache_dir: Optional[str] = None
    """Where a JSONL ``path`` is prepared once (tokenized into indexed files, keyed by its
    content hash); null = ``.longpo-prepared/`` beside the JSONL. Unused when ``path`` is
    already a prepared directory (``longpo-preprocess``)."""
    preprocess_workers: int = 1
    """Processes global rank 0 uses to prepare a JSONL ``path`` (the other ranks wait)."""
    allow_changed_data_on_resume: bool = False
    """Resume even though the data differs from the checkpoint's (other source sha256 or
    preparation); reference scores are then matched by record id and token fingerprint."""
    validation_path: Optional[str] = None
    """Held-out JSONL records (same schema as path) scored every train.valid_interval steps
    without gradients; null = none (or split off data.validation_fraction)."""
    validation_fraction: float = 0.0
    """Fraction of the records of path held out for validation (a seeded split, taken out of
    training) when validation_path is null; 0 = no split."""
    shared_prefix: bool = False
    """Pack each pair as one sequence [shared prompt | chosen branch | rejected branch]: the
    document and first instruction are held (and computed) once, each branch attends to it and
    causally to itself, never to the other (docs/design.md). Needs the project attention
    (model.attention_backend local, flex or auto). The long-context data presets
    (conf/data/longpo_*.yaml) set it true; false here and in the toy preset, whose runs and
    tests check the two-sequence layout directly."""


@dataclass
class TrainConfig:
    """Step loop and batch geometry (a batch item is one chosen/rejected pair)."""

    train_iters: int = 20
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Pairs per micro-batch per DP rank (chosen and rejected always travel together)."""
    global_batch_size: int = 2
    """Pairs per optimizer step across DP ranks = micro_batch * grad_accum * DP."""
    gradient_accumulation_steps: Optional[int] = None
    """Micro-batches per step per DP rank; null derives it from global_batch_size."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."""
    log_interval: int = 1
    """Print and log metrics every N steps."""
    exit_duration_minutes: Optional[float] = None
    """Stop (save, exit with code 3 = requeue me) before this many minutes after process start;
    SLURM_JOB_END_TIME, when set, is a deadline too (the earlier one wins). Null = no limit of
    our own."""
    exit_margin_minutes: float = 2.0
    """Safety margin before the deadline: the run stops at the last step boundary that leaves
    the slowest recent step + the last measured save + this margin. Until a save has been
    measured the margin alone must cover one save."""
    valid_interval: int = 0
    """Score the held-out pairs (data.validation_path / data.validation_fraction) every N steps
    and at the end; 0 = only at the end when a validation set exists."""
    eval_interval: int = 0
    """Every N steps run the needle probe (longpo_megatron/eval/probe.py) on the policy at
    data.max_seq_length and log its accuracy (probe/* metrics); 0 = off."""
    max_nonfinite_steps: int = 10
    """Stop the run (exit 2, nothing saved) after this many CONSECUTIVE steps whose gradients
    were non-finite (NaN/inf: the update is skipped). Diverged runs never save NaN weights."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """Directory for checkpoints (`latest` + `iter_XXXXXXX/`, docs/checkpoint-format.md); null
    disables saving (a SIGTERM/SIGUSR1 then stops the run without saving)."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end when save is set)."""
    load: Optional[str] = None
    """Checkpoint to start from: a save directory (its `latest`) or an `iter_*` directory; a
    training checkpoint resumes everything, a weights checkpoint gives weights only (step 0).
    Any TP/PP layout loads any other. Null starts fresh."""
    keep_last: int = 2
    """Checkpoints to keep."""
    save_interval_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (or the start); 0 = off."""
    async_save: bool = False
    """Write checkpoints in the background (GPU: megatron's async torch_dist with the
    fully-parallel wrapper; CPU: a writer thread); training blocks only to copy the state.
    `latest` moves when every rank finished writing."""
    checksums: bool = True
    """Write a per-file checksum manifest (checksums.json) with every save and verify it
    before every load; a changed, torn or truncated file is refused by name."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    output_dir: str = "outputs/run"
    """Run directory (resolved config, TensorBoard events)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under output_dir/tb."""
    wandb_project: Optional[str] = None
    """Weights & Biases project; null disables W&B."""
    wandb_run_name: Optional[str] = None
    """W&B run name; null lets W&B choose."""
    peak_tflops: Optional[float] = None
    """Dense peak TFLOP/s of one GPU for MFU; null = from the GPU's name (flops.PEAK_FLOPS),
    no MFU when unknown (e.g. CPU runs; TFLOP/s are still logged)."""


@dataclass
class Config:
    """Root config composed by Hydra from conf/config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    longpo: LongPOConfig = field(default_factory=LongPOConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    defaults: list[Any] = field(default_factory=list)
    """Hydra defaults list (kept so structured-config validation accepts it)."""


GROUPS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "longpo": LongPOConfig,
    "reference": ReferenceConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def register_configs() -> None:
    """Register the schema so Hydra type-checks every YAML and override against it."""
    from hydra.core.config_store import ConfigStore

    from longpo_megatron.config_help import register_resolvers

    register_resolvers()  # ${longpo_help:} (the --help text), ${longpo_job_dir:} (multirun)
    cs = ConfigStore.instance()
    cs.store(name="longpo_schema", node=Config)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of ``node`` (a mapping) that the dataclass ``schema`` does not declare."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in node:
        name = f"{prefix}{key}"
        if key not in fields:
            out.append(name)
            continue
        sub = fields[key].default_factory  # nested group dataclasses use default_factory
        if dataclasses.is_dataclass(sub) and hasattr(node[key], "keys"):
            out += unknown_keys(node[key], sub, prefix=f"{name}.")
    return out


def to_typed(cfg: Any, schema: type, where: str) -> Any:
    """A composed DictConfig as an instance of the dataclass ``schema``; keys the schema does
    not declare are an error naming them and ``where`` the schema lives."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from longpo_megatron.config_validation import ConfigError

    extra = [k for k in unknown_keys(cfg, schema) if k != "hydra" and not k.startswith("hydra.")]
    if extra:
        raise ConfigError(f"unknown config key(s) {extra}: not in the schema ({where})")
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as e:
        raise ConfigError(unresolved_message(e)) from None
    assert isinstance(obj, schema)
    return obj


def unresolved_message(err: Exception) -> str:
    """One line naming the config key OmegaConf could not resolve (env variable, ``???``, type)."""
    import re

    from omegaconf.errors import MissingMandatoryValue

    key = getattr(err, "full_key", None) or "<config>"
    text = str(getattr(err, "msg", None) or err).splitlines()[0]
    env = re.search(r"Environment variable '([^']+)' not found", text)
    if env:
        return (
            f"{key}: environment variable {env.group(1)} is not set (the config reads "
            f"${{oc.env:{env.group(1)}}}); export it or override {key}=..."
        )
    if isinstance(err, MissingMandatoryValue):
        return f"{key}: required value is missing (???); set {key}=..."
    return f"{key}: {text}"


def to_config(cfg: Any) -> Config:
    """Turn a composed DictConfig into a typed :class:`Config` (unknown keys are an error)."""
    return to_typed(cfg, Config, "longpo_megatron/config.py")
