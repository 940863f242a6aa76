"""The in-training needle probe (``train.eval_interval``): can the policy still find a needle at
the training length?

A few fixed ``niah_single`` samples at ``data.max_seq_length`` tokens (needle at depths 0, 1/3,
2/3 and 1) are rendered with the training tokenizer as (prompt, correct answer). One forward pass
per sample through the policy, in its own TP/PP/CP/DP layout (:class:`MegatronEvaluator`), gives

- ``probe/needle_greedy_acc``: share of samples whose every answer token (and end of turn) is the
  argmax: exactly the samples greedy decoding would answer correctly, without generating;
- ``probe/needle_answer_logp``: mean log-probability per answer token.

Cost: ``len(PROBE_DEPTHS)`` forward-only passes at the training length per probe.
"""

from __future__ import annotations

from typing import Any

import torch

from longpo_megatron.data.tokenizer import ChatTokenizer
from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.eval.megatron import MegatronEvaluator
from longpo_megatron.eval.render import Row, answer_row, template_overhead, token_counter
from longpo_megatron.eval.tasks import TaskError, TaskOptions, generate

PROBE_DEPTHS = (0.0, 1 / 3, 2 / 3, 1.0)
PROBE_SEED = 20250218
"""Fixed: the probe asks the same questions at every step, so its curve is comparable."""


def probe_rows(tokenizer: ChatTokenizer, length: int, seed: int = PROBE_SEED) -> list[Row]:
    """One (prompt + answer) row per probe depth, each at most ``length`` tokens."""
    count = token_counter(tokenizer)
    rows = []
    for i, depth in enumerate(PROBE_DEPTHS):
        budget = length - template_overhead(tokenizer) - 16
        while True:
            if budget < 32:
                raise TaskError(f"needle probe: data.max_seq_length={length} is too short")
            s = generate("niah_single", budget, depth, i, seed, count, TaskOptions())
            row = answer_row(tokenizer, s.prompt, s.target)
            if len(row[0]) <= length:
                break
            budget -= len(row[0]) - length  # tokens do not add up exactly across sentences
        rows.append(row)
    return rows


class NeedleProbe:
    """Fixed probe rows plus the layout to score them in."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        length: int,
        groups: ParallelGroups,
        *,
        seq_multiple: int = 1,
        sequence_parallel: bool = False,
        chunk_size: int = 1024,
    ) -> None:
        self.tokenizer, self.groups = tokenizer, groups
        self.rows = probe_rows(tokenizer, length)
        self.answer_tokens = sum(sum(mask[1:]) for _, mask in self.rows)
        self.options = dict(
            seq_multiple=seq_multiple, sequence_parallel=sequence_parallel, chunk_size=chunk_size
        )

    @classmethod
    def for_trainer(cls, trainer: Any) -> NeedleProbe:
        """The probe of a set-up :class:`~longpo_megatron.trainer.Trainer`."""
        return cls(
            trainer.tokenizer,
            trainer.cfg.data.max_seq_length,
            trainer.groups,
            seq_multiple=trainer.layout.seq_multiple,
            sequence_parallel=trainer.layout.sequence_parallel,
            chunk_size=trainer.cfg.longpo.logits_chunk_size,
        )

    def results(self, model: torch.nn.Module) -> list[tuple[float, bool]]:
        """(Σ answer log-prob, all argmax) per probe row (collective, same on every rank)."""
        evaluator = MegatronEvaluator(model, self.groups, self.tokenizer, **self.options)
        return evaluator.loglik(self.rows)

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """The probe metrics of ``model`` (collective: every rank calls it)."""
        res = self.results(model)
        return {
            "probe/needle_greedy_acc": sum(ok for _, ok in res) / len(res),
            "probe/needle_answer_logp": sum(lp for lp, _ in res) / self.answer_tokens,
        }
