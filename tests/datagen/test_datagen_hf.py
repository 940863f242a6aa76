"""The real ``hf`` backend with a tiny random Llama on CPU: generation, parsing failures and
the counted report end to end; answers from HF through grouping into training's reader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from dg_helpers import SHARD0, compose_cfg, rows, single_thread, small_corpus

from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.tokenizer import HFChatTokenizer
from longpo_megatron.datagen.backends import GenerationRequest, TokenizerMismatch, build_backend
from longpo_megatron.datagen.backends.base import apply_config_overrides
from longpo_megatron.datagen.cli import run
from longpo_megatron.datagen.config import BackendConfig, SamplingConfig
from longpo_megatron.datagen.pipeline import StageStateError
from longpo_megatron.datagen.tiny_model import make_tiny_model
from longpo_megatron.errors import UserError

FAST = [
    "progress=false",
    "backend.batch_size=4",
    "chunking.min_tokens=150",
    "chunking.max_tokens=300",
    "instructions.sampling.max_new_tokens=40",
    "chosen.sampling.max_new_tokens=24",
    "rejected.sampling.max_new_tokens=24",
]
"""About 1,500-token documents in 150-300-token chunks keep two CPU cores under ~10 s a run."""
SAMPLED = ["chosen.sampling.do_sample=true", "rejected.sampling.do_sample=true"]


def hf_cfg(model: Path, out: Path, *extra: str):
    docs = f"input.paths=[{small_corpus(out.parent / (out.name + '-docs'))}]"
    return compose_cfg([f"backend.model={model}", f"output_dir={out}", docs, *FAST, *extra])


def test_generation_is_seeded_batched_and_reports_length(tiny_model: Path) -> None:
    backend = build_backend(BackendConfig(model=str(tiny_model), batch_size=3))
    prompts = ["The lantern service kept lights.", "Seeds are dried", "Springs on the plateau"]
    reqs = [GenerationRequest(str(i), p, 0) for i, p in enumerate(prompts)]
    greedy = SamplingConfig(max_new_tokens=16)
    first = backend.generate(reqs, greedy, 1)
    assert first == backend.generate(reqs, greedy, 2)  # greedy ignores the seed
    sampled = SamplingConfig(do_sample=True, temperature=1.0, max_new_tokens=16)
    a, b = backend.generate(reqs, sampled, 5), backend.generate(reqs, sampled, 5)
    assert a == b and a != backend.generate(reqs, sampled, 6)
    for gen in first + a:
        assert gen.finish_reason in ("stop", "length") and 0 <= gen.n_tokens <= 16
        assert (gen.finish_reason == "length") == (gen.n_tokens == 16)
    short = backend.generate(reqs, SamplingConfig(max_new_tokens=1), 0)
    assert all(g.n_tokens <= 1 for g in short)
    rows = [backend.render(p) for p in prompts]
    assert [len(g) for g in backend._groups(rows)] == [3]
    backend.cfg.max_batch_tokens = 2 * max(map(len, rows))
    assert [len(g) for g in backend._groups(rows)] == [2, 1]
    assert len(backend.generate(reqs, greedy, 0)) == 3
    assert backend.prompt_tokens(prompts[0]) > backend.count_tokens(prompts[0])
    assert backend.max_model_len() == 16384
    assert backend.describe()["model_type"] == "llama"


def test_tokenizer_that_does_not_match_the_model(tiny_model: Path, tmp_path: Path) -> None:
    big = make_tiny_model(tmp_path / "big", ["some other text " * 50], vocab_size=700)
    small = make_tiny_model(tmp_path / "small", ["tiny text"], vocab_size=300)
    cfg = BackendConfig(model=str(small), tokenizer=str(big))
    with pytest.raises(TokenizerMismatch, match="does not match the model") as info:
        build_backend(cfg)
    assert str(big) in str(info.value) and "vocab_size" in str(info.value)
    with pytest.raises(FileNotFoundError, match="backend.model"):
        build_backend(BackendConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="backend.name='nope'"):
        build_backend(BackendConfig(name="nope", model=str(tiny_model)))


def test_hf_end_to_end_counts_every_chunk(tiny_model: Path, tmp_path: Path) -> None:
    report = run(hf_cfg(tiny_model, tmp_path))
    ins = report["instructions"]
    assert report["documents"]["documents_kept"] == 2
    assert ins["chunks"] == report["documents"]["chunks"] == sum(ins["outcome"].values()) > 6
    assert ins["status"] == {"ok": ins["chunks"]} and ins["generated_tokens_this_run"] > 0
    # Random weights write no numbered questions: every chunk fails parsing, counted by reason.
    assert set(ins["outcome"]) <= {"no_questions", "bad_numbering", "wrong_count", "truncated"}
    texts = [r["text"] for r in rows(tmp_path / SHARD0 / "instructions.jsonl")]
    assert len(set(texts)) > 1
    assert report["records"]["pairs"] == 0 and report["records"]["records"] == 0
    assert (tmp_path / SHARD0 / "records.jsonl").read_text() == ""


@pytest.fixture(scope="module")
def hybrid(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Questions from the scripted backend; chosen and rejected answers from the HF model."""
    out = tmp_path_factory.mktemp("hybrid")
    scripted = [
        "backend.name=scripted_backend:make",
        f"backend.tokenizer={tiny_model}",
    ]
    with single_thread():  # module fixtures run before the per-test thread fixture
        for stage in ("chunk", "instructions"):
            run(hf_cfg(tiny_model, out, f"stage={stage}", *scripted))
        # Each stage records its own backend; `stage=all` with hf would refuse the scripted ones.
        for stage in ("chosen", "rejected", "records"):
            report = run(hf_cfg(tiny_model, out, f"stage={stage}", *SAMPLED))
    return SimpleNamespace(out=out, report=report, dir=out / SHARD0)


def test_hf_answers_become_records_training_reads(
    hybrid: SimpleNamespace, tiny_model: Path
) -> None:
    rec = hybrid.report["records"]
    assert hybrid.report["chosen"]["status"] == {"ok": hybrid.report["chosen"]["requests"]}
    assert rec["pairs"] == rec["pairs_kept"] + sum(rec["pairs_dropped"].values())
    assert rec["records"] > 0
    tok = HFChatTokenizer(tiny_model)
    cfg = SimpleNamespace(
        path=hybrid.dir / "records.jsonl",
        max_seq_length=65536,
        max_ref_seq_length=4096,
        over_length_policy="error",
    )
    dataset, _ = load_dataset(cfg, tok)
    for pair, record in zip(dataset.pairs, dataset.records):
        meta = record.metadata
        assert meta["generator"]["chosen"]["backend"]["backend"] == "hf"
        assert meta["generator"]["instructions"]["backend"]["backend"] == "scripted"
        assert meta["token_lengths"]["tokenizer"] == str(tiny_model)
        assert len(pair.rejected) == meta["token_lengths"]["long_rejected"]
        assert all(n > 0 for n in meta["token_lengths"]["generator_chosen"])


def test_rerun_of_a_finished_hf_shard_generates_nothing(
    hybrid: SimpleNamespace, tiny_model: Path
) -> None:
    before = (hybrid.dir / "records.jsonl").read_bytes()
    for stage in ("chosen", "rejected", "records"):
        report = run(hf_cfg(tiny_model, hybrid.out, f"stage={stage}", *SAMPLED))
    assert report["chosen"]["requests_this_run"] > 0  # stats of the run that made it
    assert (hybrid.dir / "records.jsonl").read_bytes() == before
    with pytest.raises(StageStateError, match=r"stage 'instructions' .*changed: \['backend'\]"):
        run(hf_cfg(tiny_model, hybrid.out, *SAMPLED))  # all: made by the scripted backend


def test_config_overrides_reach_the_model_or_are_refused(tiny_model: Path) -> None:
    """``rope_theta`` changes the rotary frequencies the loaded model uses (checked against
    1/θ^(2i/d)); a key the config class does not define is an error, not silently dropped."""
    import torch

    cfg = BackendConfig(model=str(tiny_model), config_overrides={"rope_theta": 123456.0})
    backend = build_backend(cfg)
    backend._load()
    inv_freq = backend._model.model.rotary_emb.inv_freq
    dim = 2 * inv_freq.numel()
    expected = 1.0 / 123456.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-5, atol=0)
    with pytest.raises(UserError, match=r"backend\.config_overrides\.not_a_field: .*no field"):
        build_backend(BackendConfig(model=str(tiny_model), config_overrides={"not_a_field": 1}))


def test_rope_overrides_go_into_rope_parameters_on_transformers_5() -> None:
    """transformers >= 5 keeps θ and the scaling in one ``rope_parameters`` dict and ignores a
    top-level ``rope_theta``: the overrides are written into that dict."""
    config = SimpleNamespace(rope_parameters={"rope_theta": 1e4, "rope_type": "default"})
    scaling = {"rope_type": "yarn", "factor": 8.0}
    apply_config_overrides(config, {"rope_theta": 1e6, "rope_scaling": scaling}, "m")
    assert config.rope_parameters == {"rope_theta": 1e6, "rope_type": "yarn", "factor": 8.0}
    assert not hasattr(config, "rope_theta")
    apply_config_overrides(config, {"rope_scaling": None}, "m")
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    with pytest.raises(UserError, match=r"rope_scaling=8: must be a mapping"):
        apply_config_overrides(config, {"rope_scaling": 8}, "m")
