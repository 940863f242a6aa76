"""Rank-aware LongPO loss layer: turns a stage's hidden states + a micro-batch into the loss.

This wrapper owns every cross-rank reduction; the math is in :mod:`.objective`:
- TP: log-probs come from the vocab-parallel output layer (:mod:`.logprobs`).
- CP: each rank sums its own tokens; per-sequence partial sums are all-reduced over the CP
  group (forward sum, identity backward), so every CP rank sees the full sums and gradients
  flow to the tokens each rank holds.
- DP / micro-batches: the returned loss is the mean over this micro-batch's pairs; the schedule
  divides by the number of micro-batches and the engine averages gradients over DP×CP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from torch import Tensor

from longpo_megatron.config import LongPOConfig
from longpo_megatron.data.collate import SHARED_REJECTED
from longpo_megatron.loss.logprobs import token_logprobs
from longpo_megatron.loss.objective import PairSums, longpo_objective, token_kl

METRIC_KEYS = (
    "loss",
    "nll",
    "pref_loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracy",
    "logps/policy_chosen",
    "logps/policy_rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
)


@dataclass
class LossGroups:
    """The groups the loss reduces over."""

    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    sequence_parallel: bool = False


def sequence_sums(
    logp: Tensor, batch: dict[str, Tensor], nll_scope: str, cp: dist.ProcessGroup
) -> PairSums:
    """Per-pair sums from per-token log-probs ``[2B, s]`` (rows: B chosen then B rejected)."""
    resp = batch["response_mask"].to(logp.dtype)
    nll_mask = (batch["real_mask"] if nll_scope == "full" else batch["response_mask"]).to(
        logp.dtype
    )
    pairs = logp.shape[0] // 2
    resp_sums = (logp * resp).sum(-1)
    nll_sum = -(logp[:pairs] * nll_mask[:pairs]).sum(-1)
    count = nll_mask[:pairs].sum(-1)
    parts = [resp_sums, nll_sum, count]
    with_kl = "ref_token_logps" in batch
    if with_kl:
        ref_tok = batch["ref_token_logps"][:pairs].to(logp.dtype)
        parts += [(token_kl(logp[:pairs], ref_tok) * resp[:pairs]).sum(-1), resp[:pairs].sum(-1)]
    stacked = torch.cat(parts)
    if cp.size() > 1:
        stacked = reduce_from_tensor_model_parallel_region(stacked, group=cp)
    sizes = [2 * pairs, pairs, pairs] + ([pairs, pairs] if with_kl else [])
    resp_sums, nll_sum, count, *kl = stacked.split(sizes)
    ref = batch["ref_logps"].to(logp.dtype)
    return PairSums(
        kl_sum=kl[0] if kl else None,
        kl_count=kl[1] if kl else None,
        policy_chosen=resp_sums[:pairs],
        policy_rejected=resp_sums[pairs:],
        ref_chosen=ref[:pairs],
        ref_rejected=ref[pairs:],
        nll_sum=nll_sum,
        nll_count=count,
    )


def unpack_shared_prefix(logp: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    """Packed rows ``[B, s]`` (``data.shared_prefix``) as the two-sequence rows ``[2B, s]`` the
    sums are taken over: the chosen row keeps the shared prompt and the chosen branch (so
    ``nll_scope=full`` counts the prompt once, as today), the rejected row its own branch (the
    shared prompt holds no response label). Identity for two-sequence batches."""
    if "branch" not in batch:
        return logp, batch
    branch = batch["branch"]
    keep = torch.cat([branch != SHARED_REJECTED, branch == SHARED_REJECTED]).to(logp.dtype)
    out = {k: torch.cat([batch[k], batch[k]]) * keep for k in ("response_mask", "real_mask")}
    if "ref_token_logps" in batch:
        ref = batch["ref_token_logps"]
        out["ref_token_logps"] = torch.cat([ref, torch.zeros_like(ref)])
    out["ref_logps"] = batch["ref_logps"]
    return torch.cat([logp, logp]) * keep, out


def logit_positions(batch: dict[str, Tensor], nll_scope: str) -> Tensor:
    """Which label positions need the output layer: responses of every row (rewards and
    metrics for every loss variant), plus all real tokens of chosen rows under
    ``nll_scope=full``. Prompt tokens of rejected rows are never projected."""
    select = batch["response_mask"].bool().clone()
    if "branch" in batch:  # packed: one row per pair; its chosen part is all but the rejected
        if nll_scope == "full":
            select |= batch["real_mask"].bool() & (batch["branch"] != SHARED_REJECTED)
        return select
    pairs = select.shape[0] // 2
    if nll_scope == "full":
        select[:pairs] |= batch["real_mask"][:pairs].bool()
    return select


class LongPOLossLayer:
    """Callable ``(hidden, batch, output_weight) -> (loss, metrics)`` for the last stage."""

    def __init__(self, cfg: LongPOConfig, groups: LossGroups) -> None:
        self.cfg = cfg
        self.groups = groups

    def __call__(
        self, hidden: Tensor, batch: dict[str, Tensor], output_weight: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        select = logit_positions(batch, cfg.nll_scope)
        logp = token_logprobs(
            hidden,
            output_weight,
            batch["labels"],
            select,
            cfg.logits_chunk_size,
            self.groups.tp,
            self.groups.sequence_parallel,
        )
        logp, rows = unpack_shared_prefix(logp, batch)
        sums = sequence_sums(logp, rows, cfg.nll_scope, self.groups.cp)
        per_pair, metrics = longpo_objective(sums, cfg.beta, cfg.lam, cfg.preference_loss, cfg.loss)
        reduced = {k: metrics[k].sum().reshape(1) for k in METRIC_KEYS}
        reduced["pairs"] = torch.tensor([float(per_pair.numel())], device=per_pair.device)
        return per_pair.mean(), reduced


def sequence_logps(
    hidden: Tensor,
    batch: dict[str, Tensor],
    output_weight: Tensor,
    chunk_size: int,
    groups: LossGroups,
) -> tuple[Tensor, Tensor]:
    """Σ response-token log-probs per row, and the per-token log-probs ``[rows, s]`` (0 off
    responses) — reference scoring: no NLL, no pairs."""
    logp = token_logprobs(
        hidden,
        output_weight,
        batch["labels"],
        batch["response_mask"].bool(),
        chunk_size,
        groups.tp,
        groups.sequence_parallel,
    )
    sums = (logp * batch["response_mask"].to(logp.dtype)).sum(-1)
    if groups.cp.size() > 1:
        sums = reduce_from_tensor_model_parallel_region(sums, group=groups.cp)
    return sums, logp
