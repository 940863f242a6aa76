"""The generation backends of longpo-datagen reused for evaluation: greedy settings and batching
reach the ``vllm`` adapter (against the datagen tests' stand-in module); log-likelihoods are
refused there with a clear message; the ``hf`` scorer's left padding changes no number."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from longpo_megatron.data.tokenizer import HFChatTokenizer
from longpo_megatron.datagen.config import BackendConfig
from longpo_megatron.eval.backends import EvalConfigError, GenerationEvaluator
from longpo_megatron.eval.render import answer_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datagen"))
from dg_helpers import corpus_texts  # noqa: E402
from test_datagen_vllm import FakeLLM, FakeParams  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from longpo_megatron.datagen.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", corpus_texts()[:2])


def test_vllm_greedy_batches_and_no_loglik(tiny: Path, monkeypatch) -> None:
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, FakeParams, "0-fake"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    cfg = BackendConfig(name="vllm", model=str(tiny), batch_size=2)
    ev = GenerationEvaluator(cfg, HFChatTokenizer(tiny))
    prompts = [f"prompt {i}" for i in range(5)]
    out = ev.generate(prompts, max_new_tokens=7)
    calls = FakeLLM.instances[0].calls
    assert [len(p) for p, _ in calls] == [2, 2, 1]  # backend.batch_size per call
    params = [p.kwargs for _, ps in calls for p in ps]
    assert all(p["temperature"] == 0.0 and p["max_tokens"] == 7 for p in params)  # greedy
    sent = [p["prompt_token_ids"] for ps, _ in calls for p in ps]
    assert sent == [ev.backend.render(p) for p in prompts]  # the model's chat template
    assert out == [f"answer {len(ids)}" for ids in sent]
    with pytest.raises(EvalConfigError, match="mode=loglik: backend.name='vllm' cannot"):
        ev.loglik([([1, 2, 3], [False, True, True])])


def test_hf_loglik_does_not_depend_on_batching(tiny: Path) -> None:
    cfg = BackendConfig(name="hf", model=str(tiny), device="cpu", dtype="float32")
    tok = HFChatTokenizer(tiny)
    rows = [answer_row(tok, "word " * n, "the answer " * (n % 3 + 1)) for n in (3, 40, 11, 25)]
    together = GenerationEvaluator(cfg, tok).loglik(rows)
    cfg.max_batch_tokens = 1  # one row per forward pass: no padding at all
    alone = GenerationEvaluator(cfg, tok).loglik(rows)
    assert [ok for _, ok in together] == [ok for _, ok in alone]
    assert [lp for lp, _ in together] == pytest.approx([lp for lp, _ in alone], rel=1e-5)
