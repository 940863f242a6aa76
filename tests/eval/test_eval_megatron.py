"""The Megatron-checkpoint path against the HF-export path on one tiny model.

A tiny random Llama (HF) is converted to a Megatron weights checkpoint with the repo's
converter, and that checkpoint is exported back to HF. ``longpo-eval`` then scores the same
samples through transformers (the export) and through the project model (the checkpoint, TP=1 in
process; TP=2, PP=2, CP=2 and DP=2 on two gloo ranks): the log-likelihoods agree to fp32
rounding, the choices and greedy checks are the same, and greedy generation writes the same text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_harness import run_distributed

from longpo_megatron.eval.cli import run
from longpo_megatron.eval.config import EvalConfig

pytest.importorskip("transformers")

TASKS = ["niah_single", "niah_multivalue", "vt", "cwe", "qa"]
N_SAMPLES = 9


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``megatron``: converted from a tiny HF Llama; ``export``: that checkpoint back in HF."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datagen"))
    from dg_helpers import corpus_texts

    from longpo_megatron.datagen.tiny_model import make_tiny_model
    from longpo_megatron.export.convert import convert_hf_to_megatron, convert_megatron_to_hf

    base = tmp_path_factory.mktemp("mg")
    hf = make_tiny_model(base / "hf", corpus_texts(), max_positions=1024, seed=3)
    convert_hf_to_megatron(hf, base / "megatron", pad_vocab_multiple=2, progress=False)
    convert_megatron_to_hf(base / "megatron", base / "export", progress=False)
    return {"megatron": base / "megatron", "export": base / "export"}


def eval_cfg(model: Path, mode: str, out: Path, **megatron: int) -> EvalConfig:
    cfg = EvalConfig(model=str(model), mode=mode, tasks=TASKS, lengths=[320])
    cfg.depths, cfg.samples, cfg.max_new_tokens = [0.0, 1.0], 1, 4
    cfg.output_dir, cfg.backend.device, cfg.backend.dtype = str(out), "cpu", "float32"
    for k, v in megatron.items():
        setattr(cfg.megatron, k, v)
    return cfg


def _same_samples(hf: dict, mg: dict, mode: str) -> None:
    assert len(hf["samples"]) == len(mg["samples"]) == N_SAMPLES
    for a, b in zip(hf["samples"], mg["samples"]):
        assert (a["task"], a["length"], a["depth"]) == (b["task"], b["length"], b["depth"])
        assert a["prompt_tokens"] == b["prompt_tokens"]
        assert a["scores"] == b["scores"]
        if mode == "loglik":
            assert b["logps"] == pytest.approx(a["logps"], rel=2e-6, abs=2e-5)
        else:
            assert a["output"] == b["output"]
    assert hf["cells"] == mg["cells"]


@pytest.fixture(scope="module")
def hf_results(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """The HF export's results in both modes."""
    out = tmp_path_factory.mktemp("hf")
    return {m: run(eval_cfg(checkpoints["export"], m, out / m)) for m in ("loglik", "generate")}


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_export_and_checkpoint_agree(checkpoints, hf_results, mode: str, tmp_path: Path) -> None:
    hf = hf_results[mode]
    mg = run(eval_cfg(checkpoints["megatron"], mode, tmp_path / "mg"))
    assert hf["model"]["backend"] == "hf" and mg["model"]["backend"] == "megatron"
    _same_samples(hf, mg, mode)
    if mode == "generate":
        assert any(s["output"].strip() for s in mg["samples"])  # it did write something


def eval_worker(rank: int, world: int, *, model: str, mode: str, out: str, layout: dict) -> dict:
    cfg = eval_cfg(Path(model), mode, Path(out), **layout)
    return run(cfg)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        {"tensor_model_parallel_size": 2},
        pytest.param({"pipeline_model_parallel_size": 2}, marks=pytest.mark.slow),
        pytest.param({"context_parallel_size": 2}, marks=pytest.mark.slow),
        pytest.param({}, marks=pytest.mark.slow),  # two data-parallel replicas share the rows
    ],
    ids=["tp2", "pp2", "cp2", "dp2"],
)
def test_checkpoint_in_parallel_layouts(checkpoints, hf_results, layout, tmp_path) -> None:
    hf = hf_results["loglik"]
    results = run_distributed(
        eval_worker,
        2,
        timeout_s=300,
        model=str(checkpoints["megatron"]),
        mode="loglik",
        out=str(tmp_path / "mg"),
        layout=layout,
    )
    for mg in results:  # every rank holds the whole result
        _same_samples(hf, mg, "loglik")
    assert results[0]["model"]["layout"]["tp"] == layout.get("tensor_model_parallel_size", 1)
    assert results[0]["model"]["layout"]["dp"] == (1 if layout else 2)


class OneRank:
    """A stand-in for a one-rank TP group (only rank() and size() are asked)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1


def test_argmax_skips_vocabulary_padding_and_breaks_ties_low() -> None:
    import torch

    from longpo_megatron.eval.megatron import vocab_parallel_argmax

    weight = torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [9.0, 0.0]])  # id 3 = padding
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert vocab_parallel_argmax(h, weight, OneRank()).tolist() == [3, 0]
    assert vocab_parallel_argmax(h, weight, OneRank(), vocab_limit=3).tolist() == [1, 0]
