"""The one interface every generation backend implements, plus shared chat-template helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

from longpo_megatron.data.records import DataError, DataFileNotFound
from longpo_megatron.datagen.config import BackendConfig, SamplingConfig
from longpo_megatron.errors import UserError


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: a single user message that the backend renders with the chat template."""

    key: str
    prompt: str
    seed: int
    """Per-request seed (backends that seed per request, e.g. vLLM)."""


@dataclass(frozen=True)
class Generation:
    """One answer: text without special tokens, its token count and why it ended."""

    text: str
    n_tokens: int
    finish_reason: str
    """stop (end of turn) | length (hit max_new_tokens: the answer is truncated)."""


@runtime_checkable
class GenerationBackend(Protocol):
    """What the pipeline needs from a model."""

    name: str

    def describe(self) -> dict[str, Any]:
        """Model and settings, stored in every record's metadata and the resume fingerprint."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of plain text (chunking)."""
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the chat-rendered prompt, generation prompt included."""
        ...

    def max_model_len(self) -> Optional[int]:
        """Longest prompt + answer the model takes (None = unknown / no limit)."""
        ...

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, batch_seed: int
    ) -> list[Generation]:
        """Answers in request order; ``batch_seed`` seeds batch-level sampling."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


class TokenizerMismatch(UserError, ValueError):
    """The tokenizer cannot drive the model (ids past the embedding)."""


def check_vocab(tok_name: str, tok_size: int, max_id: int, model_name: str, vocab: int) -> None:
    """Refuse a tokenizer whose ids do not fit the model's vocabulary."""
    if tok_size > vocab or max_id >= vocab:
        raise TokenizerMismatch(
            f"tokenizer {tok_name!r} has {tok_size} tokens (largest id {max_id}) but model "
            f"{model_name!r} has vocab_size {vocab}: the tokenizer does not match the model "
            "(set backend.tokenizer to the model's own tokenizer)"
        )


def local_dir(value: Optional[str], key: str) -> str:
    """A local directory given by config ``key`` (nothing is downloaded)."""
    if not value or not Path(value).is_dir():
        raise DataFileNotFound(
            f"{key}={value!r} is not a local directory (models and tokenizers are never "
            "downloaded; point it at a saved model)"
        )
    return str(value)


_ROPE_KEYS = ("rope_theta", "rope_scaling")
"""Keys that transformers >= 5 keeps inside the config's one ``rope_parameters`` dict."""


def apply_config_overrides(config: Any, overrides: dict[str, Any], model: str) -> None:
    """Set ``backend.config_overrides`` on a loaded HF ``config``, refusing any it would ignore.

    ``AutoConfig.from_pretrained(**overrides)`` silently drops keys the config class does not
    define (e.g. ``rope_scaling`` on a Mistral config), and transformers 5 also drops
    ``rope_theta``, which moved into ``rope_parameters``: the model would run at its stored θ.
    Here the RoPE keys go where the installed transformers reads them, and any other key must
    be a field of the config. ``overrides`` is plain data (``config.to_typed`` made it so).
    """
    rope = getattr(config, "rope_parameters", None)
    for key, value in overrides.items():
        if key in _ROPE_KEYS and isinstance(rope, dict):
            _set_rope(rope, key, value, model)
        elif hasattr(config, key):
            setattr(config, key, value)
        else:
            raise UserError(
                f"backend.config_overrides.{key}: {type(config).__name__} of {model} has no "
                f"field {key!r}, so the model would ignore the override (set it in the "
                "model's config.json, or override a field the config has)"
            )


def _set_rope(rope: dict, key: str, value: Any, model: str) -> None:
    """One RoPE override written into a transformers-5 ``rope_parameters`` dict (in place)."""
    where = f"backend.config_overrides.{key}"
    if any(isinstance(v, dict) for v in rope.values()):
        raise UserError(f"{where}: {model} has per-layer-type rope_parameters; edit config.json")
    if key == "rope_theta":
        rope["rope_theta"] = float(value)
    elif value is None:  # no scaling: plain RoPE at the current θ
        theta = rope.get("rope_theta")
        rope.clear()
        rope.update(rope_type="default", rope_theta=theta)
    elif isinstance(value, dict):
        rope.update(value)
    else:
        raise UserError(f"{where}={value!r}: must be a mapping (rope_type, factor, ...) or null")


class HFTokenizerMixin:
    """Chat-template rendering and token counting with a local HF tokenizer."""

    tokenizer: Any
    tokenizer_path: str

    def _load_tokenizer(self, cfg: BackendConfig) -> None:
        from transformers import AutoTokenizer

        self.tokenizer_path = local_dir(cfg.tokenizer or cfg.model, "backend.tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.tokenizer_path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"tokenizer {self.tokenizer_path!r} has no chat template")
        if self.tokenizer.eos_token_id is None:
            raise DataError(f"tokenizer {self.tokenizer_path!r} has no eos (end-of-turn) token")

    def _check_model_vocab(self, model_name: str, vocab: int) -> None:
        vocab_ids = self.tokenizer.get_vocab().values()
        check_vocab(self.tokenizer_path, len(self.tokenizer), max(vocab_ids), model_name, vocab)

    def _load_local_model(self, cfg: BackendConfig) -> None:
        """Resolve ``backend.model``, load its tokenizer and config, check their vocabularies."""
        from transformers import AutoConfig

        self.cfg = cfg
        self.model_path = local_dir(cfg.model, "backend.model")
        self._load_tokenizer(cfg)
        self.model_config = AutoConfig.from_pretrained(
            self.model_path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        apply_config_overrides(self.model_config, cfg.config_overrides, self.model_path)
        self._check_model_vocab(self.model_path, int(self.model_config.vocab_size))

    def max_model_len(self) -> Optional[int]:
        """backend.max_model_len, else the model's max_position_embeddings."""
        if self.cfg.max_model_len:
            return int(self.cfg.max_model_len)
        value = getattr(self.model_config, "max_position_embeddings", None)
        return int(value) if value else None

    def count_tokens(self, text: str) -> int:
        """Tokens of plain text, no special tokens added."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def render(self, prompt: str) -> list[int]:
        """Ids of the chat-rendered single user turn plus the generation prompt."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(self, prompt: str) -> int:
        """Length of :meth:`render`."""
        return len(self.render(prompt))
