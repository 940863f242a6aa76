"""``hf`` backend: batched ``transformers`` generate with left padding (CPU or one GPU).

The tokenizer loads at once (chunking needs only it); the weights load on the first generate.
Sampling is seeded per batch: the pipeline's batches are fixed, so a rerun reproduces them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from longpo_megatron.datagen.backends.base import (
    Generation,
    GenerationRequest,
    HFTokenizerMixin,
)
from longpo_megatron.datagen.config import BackendConfig, DatagenConfigError, SamplingConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")


class HFBackend(HFTokenizerMixin):
    """Local ``AutoModelForCausalLM`` + its chat template."""

    name = "hf"

    def __init__(self, cfg: BackendConfig) -> None:
        if cfg.dtype not in DTYPES:
            raise DatagenConfigError(f"backend.dtype={cfg.dtype!r}: must be one of {DTYPES}")
        self._load_local_model(cfg)
        self._model: Any = None
        self._device: Any = None

    def describe(self) -> dict[str, Any]:
        """Model, tokenizer and load settings."""
        return {
            "backend": self.name,
            "model": self.model_path,
            "tokenizer": self.tokenizer_path,
            "model_type": getattr(self.model_config, "model_type", None),
            "dtype": self.cfg.dtype,
            "config_overrides": dict(self.cfg.config_overrides),
            "batch_size": self.cfg.batch_size,
            "max_batch_tokens": self.cfg.max_batch_tokens,
        }

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self._device = torch.device(device)
        import transformers

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            config=self.model_config,
            **{dtype_key: getattr(torch, dtype)},
            local_files_only=True,
            trust_remote_code=self.cfg.trust_remote_code,
        )
        self._model.to(self._device).eval()

    def _generation_config(self, sampling: SamplingConfig) -> Any:
        gen = copy.deepcopy(self._model.generation_config)
        eos = {int(self.tokenizer.eos_token_id)}
        model_eos = gen.eos_token_id
        if model_eos is not None:
            eos |= set(model_eos if isinstance(model_eos, list) else [model_eos])
        pad = self.tokenizer.pad_token_id
        gen.update(
            max_new_tokens=sampling.max_new_tokens,
            max_length=None,
            do_sample=sampling.do_sample,
            temperature=sampling.temperature if sampling.do_sample else None,
            top_p=sampling.top_p if sampling.do_sample else None,
            top_k=(sampling.top_k or None) if sampling.do_sample else None,
            eos_token_id=sorted(eos),
            pad_token_id=int(pad) if pad is not None else min(eos),
        )
        return gen

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, batch_seed: int
    ) -> list[Generation]:
        """Left-padded ``generate`` calls over consecutive groups within max_batch_tokens."""
        if not requests:
            return []
        if self._model is None:
            self._load()
        gen = self._generation_config(sampling)
        rows = [self.render(r.prompt) for r in requests]
        out: list[Generation] = []
        for k, group in enumerate(self._groups(rows)):
            out += self._generate_group(group, gen, batch_seed + k)
        return out

    def _groups(self, rows: list[list[int]]) -> list[list[list[int]]]:
        """Consecutive groups whose padded size (count x longest) fits max_batch_tokens."""
        groups: list[list[list[int]]] = []
        for row in rows:
            last = groups[-1] if groups else None
            if (
                last
                and (len(last) + 1) * max(len(row), *map(len, last)) <= self.cfg.max_batch_tokens
            ):
                last.append(row)
            else:
                groups.append([row])
        return groups

    def _generate_group(self, rows: list[list[int]], gen: Any, seed: int) -> list[Generation]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), gen.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self._model.generate(
                input_ids=ids.to(self._device),
                attention_mask=mask.to(self._device),
                generation_config=gen,
            )
        return [self._decode(row[width:].tolist(), set(gen.eos_token_id)) for row in out.cpu()]

    def _decode(self, new: list[int], eos: set[int]) -> Generation:
        """Cut at the first end-of-turn token; without one the answer hit the length limit."""
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        body = new if stop is None else new[:stop]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        return Generation(text, len(body), "length" if stop is None else "stop")

    def close(self) -> None:
        """Drop the weights."""
        self._model = None
