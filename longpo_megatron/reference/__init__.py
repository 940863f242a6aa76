"""The frozen reference π_ref: Σ_i log π_ref(y_i | x_S,i) for every chosen and rejected response.

``reference.mode``:
- ``initial_policy``: score every pair once at start with the frozen initial weights (a frozen
  reference on fixed data gives the same numbers every step), then free the model;
- ``online``: keep the frozen reference beside the policy and score each step's pairs within the
  step (the authors' setup; weights from ``reference.load`` or the initial policy);
- ``precomputed``: read scores written by ``longpo-ref-logps``; no reference weights are loaded.
For ``loss=dpo`` the reference sees the LONG prompt instead (plain DPO on the same data).
"""

from __future__ import annotations

from typing import Optional

from longpo_megatron.process import silence_fallback_warnings

# This package is the import path of the ``longpo-ref-logps`` entry point and imports megatron
# at import time: hide megatron's "not installed, falling back" notes first, as every other
# entry point does, so that a user error is the first line printed.
silence_fallback_warnings()

import torch  # noqa: E402

from longpo_megatron.config import Config  # noqa: E402
from longpo_megatron.data.dataset import PreferenceDataset  # noqa: E402
from longpo_megatron.distributed import ParallelGroups  # noqa: E402
from longpo_megatron.model.gpt import ModelLayout  # noqa: E402
from longpo_megatron.reference.scorer import ReferenceScorer, pair_sums  # noqa: E402
from longpo_megatron.reference.sequences import fingerprint, reference_items, view_of  # noqa: E402
from longpo_megatron.reference.store import ReferenceStoreError, load_store  # noqa: E402
from longpo_megatron.schedule.forward_step import unwrap  # noqa: E402

__all__ = [
    "ReferenceScorer",
    "ReferenceStoreError",
    "build_scorer",
    "fingerprint",
    "load_store",
    "pair_sums",
    "reference_items",
    "score_reference",
    "view_of",
]


def build_scorer(
    cfg: Config,
    layout: ModelLayout,
    groups: ParallelGroups,
    pad_id: int,
    policy: Optional[torch.nn.Module] = None,
) -> ReferenceScorer:
    """A frozen reference with weights from ``reference.load``, else ``policy``'s current ones."""
    if cfg.reference.load:
        from longpo_megatron import checkpoint

        scorer = ReferenceScorer(cfg, layout, groups, None, pad_id)
        checkpoint.load(cfg.reference.load, scorer.model, scorer.groups, restore_rng=False)
        return scorer
    if policy is None:
        raise ValueError("reference: no weights (set reference.load or pass the initial policy)")
    return ReferenceScorer(cfg, layout, groups, unwrap(policy).state_dict(), pad_id)


def score_reference(
    policy: torch.nn.Module,
    cfg: Config,
    layout: ModelLayout,
    groups: ParallelGroups,
    dataset: PreferenceDataset,
    pad_id: int,
) -> None:
    """Fill ``dataset``'s reference table for ``reference.mode`` initial_policy or precomputed
    (``online`` keeps a :func:`build_scorer` model and fills it step by step instead).

    ``policy`` must still hold the initial weights (fresh start or a weights checkpoint).
    """
    if cfg.reference.mode == "precomputed":
        load_store(cfg.reference.path, cfg, dataset)
        return
    build_scorer(cfg, layout, groups, pad_id, policy).fill(dataset, range(len(dataset)))
