"""The ``vllm`` backend: its adapter against a stand-in module everywhere, and the real engine
with the tiny model where vllm and a GPU exist."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from longpo_megatron.datagen.backends import GenerationRequest, build_backend
from longpo_megatron.datagen.config import BackendConfig, SamplingConfig


class FakeLLM:
    """Records what the adapter hands vLLM; answers from the prompt length."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts: list, params: list, use_tqdm: bool = True) -> list:
        self.calls.append((prompts, params))
        outs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            finish = "length" if i == 1 else "stop"
            best = types.SimpleNamespace(
                text=f"answer {len(prompt['prompt_token_ids'])}",
                token_ids=[1] * min(3, p.kwargs["max_tokens"]),
                finish_reason=finish,
            )
            outs.append(types.SimpleNamespace(outputs=[best]))
        return outs


class FakeParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeParams
    module.__version__ = "0.0-fake"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_adapter_passes_settings_and_maps_results(fake_vllm: Any, tiny_model: Path) -> None:
    cfg = BackendConfig(
        name="vllm",
        model=str(tiny_model),
        tensor_parallel_size=4,
        max_model_len=8192,
        config_overrides={"rope_theta": 1e6},
        dtype="bfloat16",
    )
    backend = build_backend(cfg)
    assert FakeLLM.instances == []  # the engine starts lazily (chunking needs no GPU)
    assert backend.max_model_len() == 8192 and backend.describe()["vllm_version"] == "0.0-fake"
    reqs = [GenerationRequest("a", "first prompt", 11), GenerationRequest("b", "second", 12)]
    greedy = backend.generate(reqs, SamplingConfig(max_new_tokens=5), 99)
    llm = FakeLLM.instances[0]
    assert llm.kwargs["tensor_parallel_size"] == 4 and llm.kwargs["max_model_len"] == 8192
    assert llm.kwargs["hf_overrides"] == {"rope_theta": 1e6} and llm.kwargs["dtype"] == "bfloat16"
    prompts, params = llm.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == [backend.render(r.prompt) for r in reqs]
    assert [p.kwargs["seed"] for p in params] == [11, 12]
    assert params[0].kwargs["temperature"] == 0.0 and params[0].kwargs["max_tokens"] == 5
    assert [(g.finish_reason, g.n_tokens) for g in greedy] == [("stop", 3), ("length", 3)]
    sampled = SamplingConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=20)
    backend.generate(reqs, sampled, 0)
    kw = llm.calls[1][1][0].kwargs
    assert (kw["temperature"], kw["top_p"], kw["top_k"]) == (0.7, 0.9, 20)
    assert len(FakeLLM.instances) == 1


def test_missing_vllm_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        build_backend(BackendConfig(name="vllm", model=str(tiny_model)))


@pytest.mark.gpu
def test_real_vllm_generates(tiny_model: Path) -> None:
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a GPU")
    backend = build_backend(
        BackendConfig(name="vllm", model=str(tiny_model), dtype="float32", max_model_len=4096)
    )
    reqs = [GenerationRequest(str(i), f"prompt {i}", i) for i in range(4)]
    sampling = SamplingConfig(do_sample=True, max_new_tokens=16)
    first = backend.generate(reqs, sampling, 0)
    assert first == backend.generate(list(reversed(reqs)), sampling, 0)[::-1]
    assert all(g.n_tokens <= 16 for g in first)
