"""The LongPO objective as pure tensor math (no torch.distributed, no megatron).

Inputs are per-pair sums already reduced over every rank that holds part of a sequence:
policy and reference log-probs of the chosen (y_S) and rejected (y_L) responses summed over all
turns' response tokens, and the NLL numerator/denominator of the chosen long sequence.

    Δ = β[(π_c − r_c) − (π_r − r_r)],   L_i = NLL_i + λ·pref(Δ_i)

with pref = −log σ(Δ) (sigmoid), IPO's squared loss, or a hinge. No length normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")
LOSS_VARIANTS = ("longpo", "dpo", "sft", "sft_kl")


@dataclass
class PairSums:
    """Per-pair quantities, each of shape ``[B]``."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    nll_sum: Tensor
    """Σ −log π_θ over the NLL-counted tokens of the chosen long sequence."""
    nll_count: Tensor
    """Number of NLL-counted tokens (≥ 1 for any valid record)."""
    kl_sum: Optional[Tensor] = None
    """``loss=sft_kl``: Σ over chosen response tokens of the k3 KL estimate (else None)."""
    kl_count: Optional[Tensor] = None
    """``loss=sft_kl``: number of chosen response tokens."""


def preference_term(logits: Tensor, beta: float, kind: str) -> Tensor:
    """Per-pair preference loss from Δ (``logits`` = β·log-ratio difference)."""
    if kind == "sigmoid":
        return -F.logsigmoid(logits)
    if kind == "ipo":
        return (logits / beta - 1.0 / (2.0 * beta)) ** 2
    if kind == "hinge":
        return torch.relu(1.0 - logits)
    raise ValueError(f"longpo.preference_loss={kind!r}: expected one of {PREFERENCE_LOSSES}")


def longpo_objective(
    s: PairSums, beta: float, lam: float, preference_loss: str = "sigmoid", variant: str = "longpo"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair loss ``[B]`` and per-pair metrics (each ``[B]``, detached).

    ``variant``: ``longpo`` and ``dpo`` share this formula (they differ in what the reference
    saw); ``sft`` drops the preference term (metrics are still reported); ``sft_kl`` replaces it
    by the token-level KL to the reference on the short prompt, λ·mean_t KL_t.
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"longpo.loss={variant!r}: expected one of {LOSS_VARIANTS}")
    chosen_reward = beta * (s.policy_chosen - s.ref_chosen)
    rejected_reward = beta * (s.policy_rejected - s.ref_rejected)
    delta = chosen_reward - rejected_reward
    pref = preference_term(delta, beta, preference_loss)
    nll = s.nll_sum / s.nll_count.clamp(min=1)
    kl = torch.zeros_like(nll) if s.kl_sum is None else s.kl_sum / s.kl_count.clamp(min=1)
    if variant == "sft":
        loss = nll
    elif variant == "sft_kl":
        if s.kl_sum is None:
            raise ValueError("longpo.loss='sft_kl' needs per-token reference log-probs")
        loss = nll + lam * kl
    else:
        loss = nll + lam * pref
    metrics = {
        "loss": loss,
        "nll": nll,
        "pref_loss": pref,
        "kl": kl,
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": delta,
        "rewards/accuracy": (chosen_reward > rejected_reward).to(loss.dtype),
        "logps/policy_chosen": s.policy_chosen,
        "logps/policy_rejected": s.policy_rejected,
        "logps/ref_chosen": s.ref_chosen,
        "logps/ref_rejected": s.ref_rejected,
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def token_kl(policy_logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate on sampled tokens (Schulman's k3: e^r − 1 − r,
    r = log π_ref − log π_θ): non-negative, unbiased, low variance."""
    r = ref_logp - policy_logp
    return torch.exp(r) - 1.0 - r
