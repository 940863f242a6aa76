"""Every shipped YAML composes with Hydra and validates; every validation rule refuses with a
message that names the key and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from longpo_megatron import config_validation
from longpo_megatron.config import GROUPS, Config, ModelConfig, register_configs, to_config
from longpo_megatron.config_validation import (
    ALLOWED,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    ConfigError,
    ResolvedLayout,
    validate_config,
)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PLACEHOLDERS = ["data.path=/placeholder/data.jsonl", "data.tokenizer=/placeholder/tokenizer"]
"""Values for the required (???) keys of the real-data configs."""

EXTRA: dict[tuple[str, str], list[str]] = {
    # tiny has 4 heads / 2 KV groups: TP=8 needs a real model.
    ("parallel", "tp8_cp4"): ["model=mistral_7b"],
    ("data", "longpo_128k"): ["model=mistral_7b", "model.max_position_embeddings=131072"]
    + PLACEHOLDERS,
    ("data", "longpo_256k"): ["model=mistral_7b", "model.max_position_embeddings=262144"]
    + PLACEHOLDERS,
    ("data", "longpo_512k"): ["model=mistral_7b", "model.max_position_embeddings=524288"]
    + PLACEHOLDERS,
    ("reference", "precomputed"): ["reference.path=/placeholder/ref_logps.jsonl"],
}
"""Overrides an option needs to fit the otherwise-default composition."""


def options(group: str) -> list[str]:
    """Stems of the YAML files shipped in ``conf/<group>/``."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUP_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


@pytest.fixture(scope="module", autouse=True)
def _schema() -> None:
    register_configs()


def compose_config(overrides: list[str]) -> Config:
    """Compose ``conf/config.yaml`` with Hydra overrides into a typed Config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def implied_world(cfg: Config) -> int:
    """World size the configured layout implies (DP null counts as 1)."""
    p = cfg.parallel
    dp = p.data_parallel_size or 1
    return (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size * dp
    )


def needs_cuda(cfg: Config) -> bool:
    """Whether the config can only run on a CUDA machine."""
    return (
        cfg.parallel.engine == "gpu"
        or cfg.train.precision == "bf16"
        or cfg.model.attention_backend == "te"
        or bool(cfg.parallel.sequence_parallel)
    )


# --- shipped YAMLs ----------------------------------------------------------------------------


def test_conf_groups_match_schema() -> None:
    dirs = {p.name for p in CONF.iterdir() if p.is_dir()}
    # datagen: tests/datagen; eval: tests/eval; hydra: the --help template
    assert dirs == set(GROUPS) | {"experiment", "datagen", "eval", "hydra"}
    assert all(options(g) for g in GROUPS)


def test_default_composition_validates_on_one_cpu_rank() -> None:
    layout = validate_config(compose_config([]), world_size=1, cuda_available=False)
    assert layout == ResolvedLayout(1, 1, 1, 1, 2, 1, "cpu", False, "fp32", "local")


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=lambda x: str(x))
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}", *EXTRA.get((group, option), [])])
    layout = validate_config(cfg, implied_world(cfg), cuda_available=needs_cuda(cfg))
    assert layout.world_size == implied_world(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment: str, with_te) -> None:
    cfg = compose_config([f"experiment={experiment}", *PLACEHOLDERS])
    assert cfg.model.name != "tiny" and cfg.data.path == "/placeholder/data.jsonl"
    layout = validate_config(cfg, implied_world(cfg), cuda_available=True)
    assert layout.engine == "gpu" and layout.precision == "bf16" and layout.sequence_parallel
    assert layout.cp > 1 and cfg.data.max_seq_length % layout.seq_multiple == 0
    assert layout.grad_accum * layout.dp * cfg.train.micro_batch_size == 8
    with pytest.raises(ConfigError, match="parallel.engine='gpu'"):
        validate_config(cfg, implied_world(cfg), cuda_available=False)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_requires_data_path_and_tokenizer(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LONGPO_DATA", raising=False)
    monkeypatch.delenv("LONGPO_TOKENIZER", raising=False)
    with pytest.raises(ConfigError, match="^data.path: environment variable LONGPO_DATA is not"):
        compose_config([f"experiment={experiment}"])
    with pytest.raises(ConfigError, match="^data.tokenizer: environment variable LONGPO_TOKENIZER"):
        compose_config([f"experiment={experiment}", "data.path=/d.jsonl"])
    monkeypatch.setenv("LONGPO_DATA", "/env/d.jsonl")
    monkeypatch.setenv("LONGPO_TOKENIZER", "/env/tok")
    cfg = compose_config([f"experiment={experiment}"])
    assert (cfg.data.path, cfg.data.tokenizer) == ("/env/d.jsonl", "/env/tok")


def test_schema_rejects_unknown_keys_and_bad_types() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.hidden=3"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["model.num_layers=many"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['model.foo'\]"):
        compose_config(["+model.foo=1"])


ARCHITECTURES = {
    "mistral_7b": (32, 4096, 14336, 32, 8, 32000, 1e-5, False, 1e7, 1e6),
    "qwen2_5_7b": (28, 3584, 18944, 28, 4, 152064, 1e-6, True, 1e7, 1e6),
    "llama3_1_8b": (32, 4096, 14336, 32, 8, 128256, 1e-5, False, 5e5, 5e5),
}
"""layers, hidden, ffn, heads, kv groups, vocab, eps, qkv bias, policy θ, reference θ."""
ARCH_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "norm_epsilon",
    "add_qkv_bias",
    "rotary_base",
    "reference_rotary_base",
)


@pytest.mark.parametrize("model", sorted(ARCHITECTURES))
def test_real_architectures(model: str) -> None:
    m = compose_config([f"model={model}"]).model
    for key, value in zip(ARCH_KEYS, ARCHITECTURES[model], strict=True):
        assert getattr(m, key) == value, key
    assert not m.tie_word_embeddings


def test_tiny_model_and_longpo_defaults_match_the_dataclasses() -> None:
    cfg = compose_config([])
    assert cfg.model == ModelConfig()
    assert (cfg.longpo.beta, cfg.longpo.lam, cfg.longpo.nll_scope) == (0.01, 0.01, "full")
    for loss in ("dpo", "sft", "sft_kl"):
        assert compose_config([f"longpo={loss}"]).longpo.loss == loss


# --- one test per validation rule ----------------------------------------------------------------


def make(**keys: object) -> Config:
    """Default Config with dotted-key overrides, e.g. ``make(**{"model.vocab_size": 300})``."""
    cfg = Config()
    for key, value in keys.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def refused(cfg: Config, world: int, cuda: bool, *fragments: str) -> str:
    """Assert validation refuses ``cfg`` with a message containing every fragment."""
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size=world, cuda_available=cuda)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.fixture
def no_te(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_validation, "te_available", lambda: False)


@pytest.fixture
def with_te(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_validation, "te_available", lambda: True)


def test_world_size_must_equal_tp_pp_cp_dp() -> None:
    cfg = make(
        **{"parallel.tensor_model_parallel_size": 2, "parallel.pipeline_model_parallel_size": 2}
    )
    refused(
        cfg,
        6,
        False,
        "world size 6",
        "parallel.tensor_model_parallel_size",
        "2*2*1 = 4",
        "TP*PP*CP*DP",
    )
    assert validate_config(cfg, 8, False).dp == 2
    cfg.parallel.data_parallel_size = 3
    refused(
        cfg, 8, False, "world size 8", "parallel.data_parallel_size", "2*2*1*3 = 12", "TP*PP*CP*DP"
    )


def test_tp_must_divide_attention_heads() -> None:
    cfg = make(**{"parallel.tensor_model_parallel_size": 8})
    refused(
        cfg,
        8,
        False,
        "parallel.tensor_model_parallel_size=8",
        "model.num_attention_heads=4",
        "TP must divide",
    )


def test_tp_must_divide_query_groups() -> None:
    cfg = make(**{"model.num_attention_heads": 8, "parallel.tensor_model_parallel_size": 4})
    refused(
        cfg,
        4,
        False,
        "parallel.tensor_model_parallel_size=4",
        "model.num_query_groups=2",
        "TP must divide",
    )


def test_query_groups_must_divide_heads() -> None:
    refused(
        make(**{"model.num_query_groups": 3}),
        1,
        False,
        "model.num_query_groups=3",
        "model.num_attention_heads=4",
        "GQA",
    )


@pytest.mark.parametrize("pp", [3, 8])
def test_pp_must_divide_layers(pp: int) -> None:
    cfg = make(**{"parallel.pipeline_model_parallel_size": pp})
    refused(
        cfg,
        pp,
        False,
        f"parallel.pipeline_model_parallel_size={pp}",
        "model.num_layers=4",
        "PP <= num_layers and PP must divide num_layers",
    )


def test_tp_must_divide_vocab() -> None:
    cfg = make(**{"model.vocab_size": 265, "parallel.tensor_model_parallel_size": 2})
    refused(cfg, 2, False, "model.vocab_size=265", "TP must divide")


def test_hidden_size_divisible_by_heads_unless_kv_channels() -> None:
    cfg = make(**{"model.hidden_size": 66})
    refused(cfg, 1, False, "model.hidden_size=66", "model.num_attention_heads=4", "kv_channels")
    cfg.model.kv_channels = 16
    validate_config(cfg, 1, False)


def test_max_seq_length_divisible_by_cp_chunks() -> None:
    cfg = make(**{"parallel.context_parallel_size": 2, "data.max_seq_length": 1022})
    refused(cfg, 2, False, "data.max_seq_length=1022", "sequence multiple 4", "2*CP = 2*2")


def test_max_seq_length_divisible_by_cp_chunks_times_tp_under_sequence_parallel(with_te) -> None:
    cfg = make(
        **{
            "parallel.context_parallel_size": 2,
            "parallel.tensor_model_parallel_size": 2,
            "data.max_seq_length": 1020,
        }
    )
    refused(
        cfg,
        4,
        True,
        "data.max_seq_length=1020",
        "sequence multiple 8",
        "2*CP = 2*2",
        "TP = 2 (sequence parallel on)",
    )
    assert validate_config(cfg, 4, False).seq_multiple == 4  # cpu: no sequence parallel


@pytest.mark.parametrize(
    ("tp", "cp", "cuda", "multiple"),
    [
        (1, 1, False, 1),
        (2, 1, False, 1),
        (1, 2, False, 4),
        (2, 1, True, 2),
        (2, 2, True, 8),
        (2, 4, True, 16),
    ],
)
def test_seq_multiple(tp: int, cp: int, cuda: bool, multiple: int, with_te) -> None:
    cfg = make(**{"parallel.tensor_model_parallel_size": tp, "parallel.context_parallel_size": cp})
    assert validate_config(cfg, tp * cp, cuda).seq_multiple == multiple


def test_max_seq_length_within_max_position_embeddings() -> None:
    refused(
        make(**{"data.max_seq_length": 8192}),
        1,
        False,
        "data.max_seq_length=8192",
        "model.max_position_embeddings=4096",
    )


def test_byte_tokenizer_needs_its_vocabulary() -> None:
    refused(
        make(**{"model.vocab_size": 256}),
        1,
        False,
        "data.tokenizer='byte'",
        "model.vocab_size=256",
        ">= 264",
    )


def test_global_batch_derives_integral_accumulation() -> None:
    cfg = make(**{"train.global_batch_size": 8, "train.micro_batch_size": 2})
    assert validate_config(cfg, 2, False).grad_accum == 2
    cfg.train.global_batch_size = 6
    refused(
        cfg,
        2,
        False,
        "train.global_batch_size=6",
        "train.micro_batch_size*DP = 2*2 = 4",
        "must be an integer",
    )


def test_explicit_accumulation_must_match_global_batch() -> None:
    cfg = make(**{"train.gradient_accumulation_steps": 3})
    refused(
        cfg,
        1,
        False,
        "train.micro_batch_size*gradient_accumulation_steps*DP = 1*3*1 = 3",
        "train.global_batch_size=2",
        "micro_batch x grad_accum x DP",
    )
    cfg.train.gradient_accumulation_steps = 2
    assert validate_config(cfg, 1, False).grad_accum == 2


@pytest.mark.parametrize("key", sorted(ALLOWED))
def test_enum_keys_are_checked(key: str) -> None:
    refused(make(**{key: "bogus"}), 1, False, f"{key}='bogus'", "must be one of")


@pytest.mark.parametrize("key", POSITIVE)
def test_positive_keys(key: str) -> None:
    refused(make(**{key: 0}), 1, False, f"{key}=0", "must be > 0")


@pytest.mark.parametrize("key", NON_NEGATIVE)
def test_non_negative_keys(key: str) -> None:
    refused(make(**{key: -1}), 1, False, f"{key}=-1", "must be >= 0")


@pytest.mark.parametrize("key", UNIT_INTERVAL)
@pytest.mark.parametrize("value", [1.0, -0.1])
def test_unit_interval_keys(key: str, value: float) -> None:
    refused(make(**{key: value}), 1, False, f"{key}={value}", f"0 <= {key} < 1")


def test_min_lr_not_above_lr() -> None:
    refused(
        make(**{"optim.min_lr": 1e-3, "optim.lr": 1e-4}),
        1,
        False,
        "optim.min_lr=0.001",
        "optim.lr=0.0001",
        "min_lr must be <= lr",
    )


def test_world_size_positive() -> None:
    refused(make(), 0, False, "world size 0", ">= 1")


def test_gpu_engine_needs_cuda() -> None:
    refused(
        make(**{"parallel.engine": "gpu"}),
        1,
        False,
        "parallel.engine='gpu'",
        "CUDA is not available",
        "needs a CUDA device",
    )


def test_te_attention_needs_cuda_and_the_gpu_engine(with_te) -> None:
    cfg = make(**{"model.attention_backend": "te"})
    refused(
        cfg,
        1,
        False,
        "model.attention_backend='te'",
        "CUDA is not available",
        "only on the gpu engine",
    )
    cfg.parallel.engine = "cpu"
    refused(cfg, 1, True, "model.attention_backend='te'", "parallel.engine is 'cpu'")


def test_te_attention_needs_transformer_engine(no_te) -> None:
    refused(
        make(**{"model.attention_backend": "te"}),
        1,
        True,
        "model.attention_backend='te'",
        "transformer_engine is not importable",
    )


def test_context_parallel_backends(with_te) -> None:
    cfg = make(**{"parallel.context_parallel_size": 2, "model.attention_backend": "local"})
    assert validate_config(cfg, 2, True).attention_backend == "local"  # gpu engine, local: fine
    assert validate_config(cfg, 2, False).engine == "cpu"  # cpu engine, local: fine
    cfg.model.attention_backend = "te"
    assert validate_config(cfg, 2, True).attention_backend == "te"
    refused(
        cfg,
        2,
        False,
        "model.attention_backend='te'",
        "context_parallel_size=2",
        "only on the gpu engine",
    )


def test_bf16_needs_the_gpu_engine() -> None:
    cfg = make(**{"train.precision": "bf16"})
    refused(cfg, 1, False, "train.precision='bf16'", "CUDA is not available", "gpu engine")
    cfg.parallel.engine = "cpu"
    refused(cfg, 1, True, "train.precision='bf16'", "parallel.engine is 'cpu'")


def test_sequence_parallel_refused_on_the_cpu_engine() -> None:
    cfg = make(**{"parallel.sequence_parallel": True, "parallel.tensor_model_parallel_size": 2})
    refused(cfg, 2, False, "parallel.sequence_parallel=True", "cpu engine", "needs CUDA")


def test_sequence_parallel_needs_tensor_parallel(no_te) -> None:
    refused(
        make(**{"parallel.sequence_parallel": True}),
        1,
        True,
        "parallel.sequence_parallel=True",
        "tensor_model_parallel_size=1",
        "needs tensor parallelism",
    )


@pytest.mark.parametrize(("backend", "cuda"), [("nccl", False), ("gloo", True)])
def test_distributed_backend_matches_engine(backend: str, cuda: bool, no_te) -> None:
    refused(
        make(**{"parallel.distributed_backend": backend}),
        1,
        cuda,
        f"parallel.distributed_backend='{backend}'",
    )


def test_tied_embeddings_with_pipeline_parallel_not_supported_yet() -> None:
    cfg = make(**{"model.tie_word_embeddings": True, "parallel.pipeline_model_parallel_size": 2})
    refused(
        cfg,
        2,
        False,
        "model.tie_word_embeddings=True",
        "parallel.pipeline_model_parallel_size=2",
        "not supported yet",
    )
    cfg.parallel.pipeline_model_parallel_size = 1
    validate_config(cfg, 1, False)


@pytest.mark.parametrize("te", [False, True])
def test_auto_values_resolve(te: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_validation, "te_available", lambda: te)
    cfg = make(**{"parallel.tensor_model_parallel_size": 2})
    cpu = validate_config(cfg, 2, False)
    assert (cpu.engine, cpu.precision, cpu.attention_backend, cpu.sequence_parallel) == (
        "cpu",
        "fp32",
        "local",
        False,
    )
    gpu = validate_config(cfg, 2, True)
    assert (gpu.engine, gpu.precision, gpu.sequence_parallel) == ("gpu", "bf16", te)
    assert gpu.attention_backend == ("te" if te else "local")


def test_precomputed_reference_needs_a_path() -> None:
    refused(make(**{"reference.mode": "precomputed"}), 1, False, "reference.path", "precomputed")


def test_sequence_parallel_needs_the_te_spec(no_te) -> None:
    cfg = make(**{"parallel.sequence_parallel": True, "parallel.tensor_model_parallel_size": 2})
    refused(cfg, 2, True, "parallel.sequence_parallel=True", "TransformerEngine spec")


# --- GPU presets: TransformerEngine pinned, layouts that fit, RoPE scaling ---------------------


@pytest.mark.parametrize("experiment", options("experiment"))
def test_gpu_experiments_pin_te_and_fail_clearly_without_it(experiment: str, no_te) -> None:
    cfg = compose_config([f"experiment={experiment}", *PLACEHOLDERS])
    assert cfg.model.attention_backend == "te" and cfg.model.recompute == "full"
    refused(cfg, implied_world(cfg), True, "model.attention_backend='te'", "transformer_engine")


STAGE_GPUS = {131072: 8, 262144: 16, 524288: 16}
"""GPUs slurm/longpo_128k.sh (1 node) and longpo_256k.sh / longpo_512k.sh (2 nodes) allocate."""


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_layout_fits_80gb_by_the_planner(experiment: str) -> None:
    from longpo_megatron.plan import HEADROOM, Layout, PlanRequest, estimate

    cfg = compose_config([f"experiment={experiment}", *PLACEHOLDERS])
    p = cfg.parallel
    gpus = STAGE_GPUS[cfg.data.max_seq_length]
    mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    lay = Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                 p.context_parallel_size, gpus // mp)  # fmt: skip
    req = PlanRequest(
        model=cfg.model, seq_len=cfg.data.max_seq_length, gpus=gpus,
        gpu_mem_gib=80, global_batch=cfg.train.global_batch_size, recompute=cfg.model.recompute,
    )  # fmt: skip
    assert estimate(req, lay).total <= HEADROOM * 80 * 2**30


def test_paper_stage_hyper_parameters() -> None:
    stages = (("128k", 131072, 5600), ("256k", 262144, 2000), ("512k", 524288, 310))
    for stage, seq, iters in stages:
        cfg = compose_config([f"experiment=mistral_{stage}", *PLACEHOLDERS])
        assert cfg.data.max_seq_length == cfg.model.max_position_embeddings == seq
        assert (cfg.optim.lr, cfg.optim.warmup_fraction, cfg.optim.weight_decay) == (5e-7, 0.1, 0)
        assert cfg.optim.lr_decay_style == "cosine" and cfg.train.train_iters == iters
        assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (1, 8)
        assert (cfg.longpo.beta, cfg.longpo.lam) == (0.01, 0.01)
    qwen = compose_config(["experiment=qwen_256k", *PLACEHOLDERS]).model
    assert (qwen.rope_scaling, qwen.reference_rope_scaling, qwen.rope_scaling_factor) == (
        "yarn", "none", 8.0,
    )  # fmt: skip
    llama = compose_config(["experiment=llama3_1_128k", *PLACEHOLDERS]).model
    assert llama.rope_scaling == "llama3" and llama.rotary_base == llama.reference_rotary_base


def test_rope_scaling_needs_its_anchor_and_a_frequency_band() -> None:
    refused(make(**{"model.rope_scaling": "yarn"}), 1, False,
            "model.rope_original_max_position_embeddings")  # fmt: skip
    refused(make(**{"model.reference_rope_scaling": "linear"}), 1, False,
            "model.reference_rope_scaling='linear'")  # fmt: skip
    llama3 = {"model.rope_scaling": "llama3", "model.rope_original_max_position_embeddings": 64}
    refused(make(**llama3, **{"model.rope_low_freq_factor": 4.0}), 1, False,
            "model.rope_high_freq_factor=4.0 must be > model.rope_low_freq_factor=4.0")  # fmt: skip
    validate_config(make(**llama3), world_size=1, cuda_available=False)


def test_reference_keeps_its_own_theta_and_scaling() -> None:
    from longpo_megatron.model.gpt import reference_model_config

    m = compose_config(["experiment=qwen_256k", *PLACEHOLDERS]).model
    ref = reference_model_config(m)
    assert (ref.rotary_base, ref.rope_scaling) == (1e6, "none")
    m128 = compose_config(["experiment=mistral_128k", *PLACEHOLDERS]).model
    assert reference_model_config(m128).rotary_base == 1e6 and m128.rotary_base == 1e7


@pytest.mark.parametrize("option", [o for o in options("data") if o.startswith("longpo_")])
def test_long_context_data_presets_pack_the_shared_prefix(option: str) -> None:
    """The presets users launch at scale hold the prompt once (data.shared_prefix)."""
    cfg = compose_config([f"data={option}", *EXTRA[("data", option)]])
    assert cfg.data.shared_prefix
    assert validate_config(cfg, 1, cuda_available=False).attention_backend == "local"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_te_experiments_pin_two_sequences(experiment: str, with_te) -> None:
    """TE cannot read the packed branch mask: a preset pinning it trains two sequences, and
    turning packing on there is refused rather than run on another attention."""
    cfg = compose_config([f"experiment={experiment}", *PLACEHOLDERS])
    assert cfg.model.attention_backend == "te" and not cfg.data.shared_prefix
    cfg.data.shared_prefix = True
    with pytest.raises(ConfigError, match="data.shared_prefix=true"):
        validate_config(cfg, implied_world(cfg), cuda_available=True)
