"""``vllm`` backend (optional extra): tensor-parallel offline inference for clusters.

Prompts go in as token ids rendered by the same chat-template code as the ``hf`` backend;
sampling is seeded per request, so an answer does not depend on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from longpo_megatron.datagen.backends.base import (
    Generation,
    GenerationRequest,
    HFTokenizerMixin,
)
from longpo_megatron.datagen.config import BackendConfig, SamplingConfig


def import_vllm() -> Any:
    """The vllm module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"backend.name=vllm needs the vllm package ({exc}); install it on a GPU machine "
            "with `pip install vllm`, or use backend=hf"
        ) from None
    return vllm


def sampling_kwargs(sampling: SamplingConfig, seed: int) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one request (temperature 0 = greedy)."""
    return {
        "temperature": sampling.temperature if sampling.do_sample else 0.0,
        "top_p": sampling.top_p if sampling.do_sample else 1.0,
        "top_k": sampling.top_k if (sampling.do_sample and sampling.top_k) else -1,
        "max_tokens": sampling.max_new_tokens,
        "seed": seed,
    }


class VLLMBackend(HFTokenizerMixin):
    """``vllm.LLM`` behind the GenerationBackend interface; the engine starts lazily."""

    name = "vllm"

    def __init__(self, cfg: BackendConfig) -> None:
        self.vllm = import_vllm()
        self._load_local_model(cfg)
        self._llm: Any = None

    def describe(self) -> dict[str, Any]:
        """Model, tokenizer, parallel and load settings."""
        return {
            "backend": self.name,
            "vllm_version": getattr(self.vllm, "__version__", "unknown"),
            "model": self.model_path,
            "tokenizer": self.tokenizer_path,
            "model_type": getattr(self.model_config, "model_type", None),
            "dtype": self.cfg.dtype,
            "tensor_parallel_size": self.cfg.tensor_parallel_size,
            "max_model_len": self.cfg.max_model_len,
            "config_overrides": dict(self.cfg.config_overrides),
            "batch_size": self.cfg.batch_size,
        }

    def _engine(self) -> Any:
        if self._llm is None:
            kwargs: dict[str, Any] = {
                "model": self.model_path,
                "tokenizer": self.tokenizer_path,
                "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "dtype": self.cfg.dtype,
                "gpu_memory_utilization": self.cfg.gpu_memory_utilization,
                "trust_remote_code": self.cfg.trust_remote_code,
                "seed": 0,
            }
            if self.cfg.max_model_len:
                kwargs["max_model_len"] = int(self.cfg.max_model_len)
            if self.cfg.config_overrides:
                kwargs["hf_overrides"] = dict(self.cfg.config_overrides)
            self._llm = self.vllm.LLM(**kwargs)
        return self._llm

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, batch_seed: int
    ) -> list[Generation]:
        """One ``LLM.generate`` call; vLLM schedules the batch itself."""
        if not requests:
            return []
        llm = self._engine()
        prompts = [{"prompt_token_ids": self.render(r.prompt)} for r in requests]
        params = [self.vllm.SamplingParams(**sampling_kwargs(sampling, r.seed)) for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result = []
        for out in outputs:
            best = out.outputs[0]
            finish = "length" if best.finish_reason == "length" else "stop"
            result.append(Generation(best.text, len(best.token_ids), finish))
        return result

    def close(self) -> None:
        """Drop the engine."""
        self._llm = None
