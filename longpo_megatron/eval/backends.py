"""Evaluation engines behind one interface.

- ``hf`` / ``vllm``: the generation backends of ``longpo-datagen`` (greedy decoding, batching)
  reused as they are; :class:`HFEvalBackend` adds the log-likelihood mode to the ``hf`` one.
- a Megatron checkpoint: :class:`longpo_megatron.eval.megatron.MegatronEvaluator`.

Every engine answers ``generate(prompts)`` with text and ``loglik(rows)`` with, per row, the
summed log-probability of its response tokens and whether each of them is the greedy argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from longpo_megatron.data.tokenizer import ChatTokenizer
from longpo_megatron.datagen.backends import GenerationRequest, build_backend
from longpo_megatron.datagen.backends.hf import HFBackend
from longpo_megatron.datagen.config import BackendConfig, SamplingConfig
from longpo_megatron.errors import UserError
from longpo_megatron.eval.render import Row


class EvalConfigError(UserError, ValueError):
    """An evaluation setting that cannot work; the message names the key."""


class Evaluator(Protocol):
    """What the evaluation loop needs from a model."""

    tokenizer: ChatTokenizer
    """Renders prompts and options (the model's own chat template)."""

    def describe(self) -> dict[str, Any]:
        """Model and settings, stored in the result file."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers (text, special tokens removed) in prompt order."""
        ...

    def loglik(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        """Per row: Σ log p(response tokens) and whether every one is the argmax."""
        ...

    def close(self) -> None:
        """Free the model."""
        ...


class HFEvalBackend(HFBackend):
    """The datagen ``hf`` backend plus batched teacher-forced scoring of response tokens."""

    def loglik(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        """Forward passes grouped by ``backend.max_batch_tokens`` (as generation)."""
        if self._model is None:
            self._load()
        out: list[tuple[float, bool]] = []
        for group in self._groups([ids for ids, _ in rows]):
            part = rows[len(out) : len(out) + len(group)]
            out += self._score_group(part)
        return out

    def _score_group(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        """Left-padded rows with explicit positions; logits only for the answer positions."""
        import torch

        width = max(len(ids) for ids, _ in rows)
        keep = max(len(ids) - mask.index(True) + 1 for ids, mask in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            attn[i, width - len(row) :] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = (
                self._model(
                    input_ids=ids.to(self._device),
                    attention_mask=attn.to(self._device),
                    position_ids=positions.to(self._device),
                    logits_to_keep=keep,  # older transformers ignore it: slice below either way
                )
                .logits[:, -keep:]
                .float()
            )
        logp = torch.log_softmax(logits[:, :-1], dim=-1).cpu()
        best = logits[:, :-1].argmax(-1).cpu()
        out = []
        for i, (row, mask) in enumerate(rows):
            # logits column c predicts token width - keep + c + 1 (c < keep - 1)
            cols = [width - len(row) + t - (width - keep) - 1 for t in range(len(row)) if mask[t]]
            col = torch.tensor(cols, dtype=torch.long)
            target = ids[i, col + width - keep + 1]
            lp = logp[i, col].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            out.append((float(lp.double().sum()), bool((best[i, col] == target).all())))
        return out


class GenerationEvaluator:
    """An ``hf`` or ``vllm`` datagen backend as an :class:`Evaluator`."""

    def __init__(self, cfg: BackendConfig, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.backend = HFEvalBackend(cfg) if cfg.name == "hf" else build_backend(cfg)

    def describe(self) -> dict[str, Any]:
        """The backend's description."""
        return self.backend.describe()

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding in batches of ``backend.batch_size``."""
        sampling = SamplingConfig(do_sample=False, max_new_tokens=max_new_tokens)
        out: list[str] = []
        size = self.cfg.batch_size
        for lo in range(0, len(prompts), size):
            reqs = [
                GenerationRequest(str(lo + i), p, 0) for i, p in enumerate(prompts[lo : lo + size])
            ]
            out += [g.text for g in self.backend.generate(reqs, sampling, 0)]
        return out

    def loglik(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        """Only the ``hf`` backend scores log-likelihoods."""
        if not isinstance(self.backend, HFEvalBackend):
            raise EvalConfigError(
                f"mode=loglik: backend.name={self.cfg.name!r} cannot score log-likelihoods; use "
                "backend.name=hf or evaluate the Megatron checkpoint (model=<checkpoint dir>)"
            )
        return self.backend.loglik(rows)

    def close(self) -> None:
        """Free the model."""
        self.backend.close()
