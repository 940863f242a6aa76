"""What the reference scores for each pair, and a fingerprint of exactly those tokens.

``loss=longpo`` (and ``sft``): every turn's SHORT sequence (chunk + instruction, response) for
the chosen and the rejected response. ``loss=dpo``: the LONG chosen and rejected sequences (plain
DPO: reference on the same prompt as the policy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.tokenize import ShortSeq, TokenizedPair


@dataclass(frozen=True)
class RefItem:
    """One sequence the reference scores: pair index, side (0 chosen, 1 rejected), turn."""

    pair: int
    side: int
    turn: int
    """Turn index; -1 for a whole long sequence (``loss=dpo``)."""
    seq: ShortSeq


def view_of(loss: str) -> str:
    """Which prompt the reference sees: ``long`` for plain DPO, else ``short``."""
    return "long" if loss == "dpo" else "short"


def pair_items(pair: TokenizedPair, view: str) -> list[RefItem]:
    """The sequences of one pair, chosen side first."""
    if view == "long":
        return [
            RefItem(pair.index, 0, -1, (pair.chosen, pair.chosen_response_mask)),
            RefItem(pair.index, 1, -1, (pair.rejected, pair.rejected_response_mask)),
        ]
    chosen = [RefItem(pair.index, 0, t, s) for t, s in enumerate(pair.ref_chosen)]
    rejected = [RefItem(pair.index, 1, t, s) for t, s in enumerate(pair.ref_rejected)]
    return chosen + rejected


def reference_items(dataset: PreferenceDataset, indices: Sequence[int], view: str) -> list[RefItem]:
    """Items of the given pairs, in pair order."""
    return [item for i in indices for item in pair_items(dataset[i], view)]


def fingerprint(pair: TokenizedPair, view: str) -> str:
    """sha256 of the token ids and response masks the reference scores for this pair.

    Any edit of the record text, a different tokenizer or chat template, or another view
    changes it, so a stored score can be matched to exactly the tokens it was computed on.
    """
    h = hashlib.sha256(view.encode())
    for item in pair_items(pair, view):
        ids, mask = item.seq
        h.update(f"|{item.side}:{item.turn}:".encode())
        h.update(",".join(map(str, ids)).encode())
        h.update(bytes(int(m) for m in mask))
    return h.hexdigest()
