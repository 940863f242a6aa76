"""Generation backends behind one interface: ``hf`` (transformers), ``vllm``, or a plug-in."""

from __future__ import annotations

import importlib

from longpo_megatron.datagen.backends.base import (
    Generation,
    GenerationBackend,
    GenerationRequest,
    TokenizerMismatch,
    check_vocab,
)
from longpo_megatron.datagen.config import BackendConfig, DatagenConfigError


def build_backend(cfg: BackendConfig) -> GenerationBackend:
    """``hf`` | ``vllm`` | ``package.module:factory`` (called with the BackendConfig)."""
    if cfg.name == "hf":
        from longpo_megatron.datagen.backends.hf import HFBackend

        return HFBackend(cfg)
    if cfg.name == "vllm":
        from longpo_megatron.datagen.backends.vllm import VLLMBackend

        return VLLMBackend(cfg)
    if ":" in cfg.name:
        module, _, attr = cfg.name.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        backend = factory(cfg)
        if not isinstance(backend, GenerationBackend):
            raise TypeError(f"backend.name={cfg.name!r} did not return a GenerationBackend")
        return backend
    raise DatagenConfigError(f"backend.name={cfg.name!r}: use hf, vllm or package.module:factory")


__all__ = [
    "Generation",
    "GenerationBackend",
    "GenerationRequest",
    "TokenizerMismatch",
    "build_backend",
    "check_vocab",
]
