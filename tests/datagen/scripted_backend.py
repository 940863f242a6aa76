"""A scripted GenerationBackend for tests: deterministic text through the real interface.

It answers like a cooperative model would (numbered questions, grounded answers), and for a
fixed share of prompts (by hash) like a faulty one: no or too few questions, refusals,
repetition loops, empty and truncated answers - so parsing, filters, counting, grouping and
resume can be checked exactly. Tokens are whitespace-separated words (additive, so chunk
bounds are exact), or a local HF tokenizer's when ``backend.tokenizer`` is set.

Environment hooks for subprocess tests: LONGPO_TEST_KILL_AFTER=N sends SIGKILL to this process
at the start of the N-th generate call; LONGPO_TEST_DELAY=seconds sleeps in every call.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Sequence
from typing import Any, Optional

from longpo_megatron.datagen.backends.base import Generation, GenerationRequest
from longpo_megatron.datagen.config import BackendConfig, SamplingConfig

MARKER = "questions about the text above"
"""Words of the default instruction template: the prompt asks for questions."""


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


class ScriptedBackend:
    """Deterministic stand-in for a chat model."""

    name = "scripted"

    def __init__(self, cfg: Optional[BackendConfig] = None, fault_every: int = 6) -> None:
        self.cfg = cfg or BackendConfig(name="scripted", model="scripted")
        self.fault_every = fault_every
        self.calls = 0
        self.requests = 0
        self._tok: Any = None
        if self.cfg.tokenizer:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.cfg.tokenizer, local_files_only=True)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": "scripted",
            "tokenizer": self.cfg.tokenizer or "whitespace",
            "fault_every": self.fault_every,
            "batch_size": self.cfg.batch_size,
        }

    def count_tokens(self, text: str) -> int:
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False))
        return len(text.split())

    def prompt_tokens(self, prompt: str) -> int:
        return self.count_tokens(prompt) + 3

    def max_model_len(self) -> Optional[int]:
        return self.cfg.max_model_len

    def close(self) -> None:
        pass

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig, batch_seed: int
    ) -> list[Generation]:
        self.calls += 1
        kill_after = os.environ.get("LONGPO_TEST_KILL_AFTER")
        if kill_after and self.calls >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("LONGPO_TEST_DELAY", "0")))
        self.requests += len(requests)
        return [self._one(r, sampling) for r in requests]

    def _one(self, req: GenerationRequest, sampling: SamplingConfig) -> Generation:
        if MARKER in req.prompt:
            text, finish = self._questions(req.prompt)
        else:
            text, finish = self._answer(req.prompt)
        words = text.split()
        if len(words) > sampling.max_new_tokens:
            text, finish = " ".join(words[: sampling.max_new_tokens]), "length"
        return Generation(text, len(text.split()), finish)

    def _questions(self, prompt: str) -> tuple[str, str]:
        fault = _h(prompt) % self.fault_every
        words = [w.strip(".,;:()\"'") for w in prompt.split("---")[0].split()]
        topics = [w for w in words if len(w) > 6][:8] or ["topic"]
        qs = [
            f"What does the text say about {topics[0]}?",
            f"How is {topics[min(1, len(topics) - 1)]} connected to the rest of the text?",
            f"Explain the role of {topics[min(2, len(topics) - 1)]} in the passage.",
            f"Why does the text mention {topics[-1]}?",
        ]
        if fault == 0:
            return "Here are some thoughts about the passage, without numbering.", "stop"
        if fault == 1:
            qs = qs[:3]
        return "\n".join(f"{i}: {q}" for i, q in enumerate(qs, start=1)), "stop"

    def _answer(self, prompt: str) -> tuple[str, str]:
        context, _, question = prompt.rpartition("\n\n")
        fault = _h(prompt) % (self.fault_every * 2)
        first = context.strip().split(".")[0][:200]
        if fault == 0:
            return "I'm sorry, but I cannot answer that question.", "stop"
        if fault == 1:
            return " ".join(["again"] * 30), "stop"
        if fault == 2:
            return "  ", "stop"
        if fault == 3:
            return "This answer goes on " + "and on " * 200, "length"
        n = len(context.split())
        return f"Reading {n} words of context: {first}. So, {question[:60].lower()}", "stop"


def make(cfg: BackendConfig) -> ScriptedBackend:
    """Factory for ``backend.name=scripted_backend:make``."""
    return ScriptedBackend(cfg)
