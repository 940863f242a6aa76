"""Every datagen YAML composes and validates; bad values are refused naming the key."""

from __future__ import annotations

import pytest
from dg_helpers import CONF, compose_cfg

from longpo_megatron.config_validation import ConfigError
from longpo_megatron.datagen.cli import flags_to_overrides
from longpo_megatron.datagen.config import (
    DatagenConfig,
    DatagenConfigError,
    parse_shard,
    validate_datagen_config,
)

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
NEEDS = ["backend.model=/placeholder/model", "input.paths=[/placeholder/docs]"]


def test_groups_are_the_expected_ones() -> None:
    assert GROUPS == ["backend", "preset"]
    assert len(OPTIONS) >= 5


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=lambda x: str(x))
def test_every_datagen_yaml_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_cfg([f"{group}={option}", *NEEDS])
    validate_datagen_config(cfg)
    assert cfg.backend.model == "/placeholder/model"


@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("preset", ["demo", "longpo_128k", "longpo_512k"])
def test_every_backend_preset_pair(backend: str, preset: str) -> None:
    cfg = compose_cfg([f"backend={backend}", f"preset={preset}", *NEEDS])
    validate_datagen_config(cfg)
    assert cfg.backend.name == backend


def test_real_presets_follow_the_reference_recipe() -> None:
    cfg = compose_cfg(["preset=longpo_128k", *NEEDS])
    c, r = cfg.chunking, cfg.records
    assert (c.min_tokens, c.max_tokens, r.max_seq_length, r.max_ref_seq_length) == (
        16384,
        30000,
        131072,
        32768,
    )
    assert c.max_document_tokens + 1024 + 1024 <= r.max_seq_length
    assert cfg.instructions.num_questions == 4 and cfg.instructions.keep_per_chunk == 1
    assert not cfg.chosen.sampling.do_sample and cfg.instructions.sampling.do_sample
    assert compose_cfg(["preset=longpo_512k", *NEEDS]).records.max_seq_length == 524288


def test_model_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGPO_DATAGEN_MODEL", raising=False)
    with pytest.raises(
        ConfigError, match=r"^backend.model: environment variable LONGPO_DATAGEN_MODEL is not set"
    ):
        compose_cfg([])
    monkeypatch.setenv("LONGPO_DATAGEN_MODEL", "/env/model")
    assert compose_cfg([]).backend.model == "/env/model"


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(Exception, match="chunking"):
        compose_cfg(["+chunking.size=3", *NEEDS])


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("stage", "everything", "stage='everything'"),
        ("shard", "3/2", "shard='3/2'"),
        ("shard", "two", "shard='two'"),
        ("chunking.max_tokens", 10, "chunking.max_tokens=10"),
        ("chunking.boundary", "page", "chunking.boundary='page'"),
        ("instructions.keep_per_chunk", 9, "instructions.keep_per_chunk=9"),
        ("records.over_length_policy", "truncate", "records.over_length_policy='truncate'"),
        ("input.policy", "ignore", "input.policy='ignore'"),
        ("backend.batch_size", 0, "backend.batch_size=0"),
    ],
)
def test_validation_names_the_key(key: str, value: object, fragment: str) -> None:
    cfg = DatagenConfig()
    section, _, name = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, name, value)
    with pytest.raises(DatagenConfigError) as info:
        validate_datagen_config(cfg)
    assert fragment in str(info.value)


def test_template_needs_its_placeholders() -> None:
    cfg = DatagenConfig()
    cfg.instructions.template = "Ask about {context}"
    with pytest.raises(DatagenConfigError, match="num_questions"):
        validate_datagen_config(cfg)
    cfg = DatagenConfig()
    cfg.chosen.sampling.top_p = 0.0
    with pytest.raises(DatagenConfigError, match=r"chosen.sampling.top_p=0.0"):
        validate_datagen_config(cfg)


def test_shard_flags_and_parsing() -> None:
    assert parse_shard("3/8") == (3, 8)
    assert flags_to_overrides(["--shard", "3/8", "--stage=chosen", "seed=1", "--cfg", "job"]) == [
        "shard=3/8",
        "stage=chosen",
        "seed=1",
        "--cfg",
        "job",
    ]
    with pytest.raises(DatagenConfigError, match="--shard needs a value"):
        flags_to_overrides(["--shard"])
