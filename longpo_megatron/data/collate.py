"""Collation into the micro-batch contract of docs/design.md.

B pairs become 2B rows (rows 0..B-1 chosen, rows B..2B-1 rejected), right-padded to S, a multiple
of ``pad_to_multiple``. Every mask is about LABELS: ``labels[:, t] = tokens[:, t+1]``, so
``response_mask[t]`` says token t+1 is a response token and ``real_mask[t]`` says it is real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from longpo_megatron.data.tokenize import ShortSeq, TokenizedPair


def padded_length(longest: int, pad_to_multiple: int = 1) -> int:
    """Smallest multiple of ``pad_to_multiple`` that holds ``longest`` tokens."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    return -(-longest // pad_to_multiple) * pad_to_multiple


def _rows_to_tensors(
    rows: Sequence[Sequence[int]],
    masks: Sequence[Sequence[bool]],
    pad_id: int,
    pad_to_multiple: int,
) -> dict[str, torch.Tensor]:
    """Pad token rows and build labels / label masks / position ids."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    for r, (ids, mask) in enumerate(zip(rows, masks)):
        if len(ids) != len(mask) or not ids:
            raise ValueError(f"row {r}: {len(ids)} ids and {len(mask)} mask entries")
    seq = padded_length(max(len(ids) for ids in rows), pad_to_multiple)
    n = len(rows)
    tokens = torch.full((n, seq), pad_id, dtype=torch.int64)
    labels = torch.full((n, seq), pad_id, dtype=torch.int64)
    response = torch.zeros((n, seq), dtype=torch.float32)
    real = torch.zeros((n, seq), dtype=torch.float32)
    for r, (ids, mask) in enumerate(zip(rows, masks)):
        length = len(ids)
        row = torch.tensor(list(ids), dtype=torch.int64)
        tokens[r, :length] = row
        labels[r, : length - 1] = row[1:]
        response[r, : length - 1] = torch.tensor(list(mask[1:]), dtype=torch.float32)
        real[r, : length - 1] = 1.0
    positions = torch.arange(seq, dtype=torch.int64).unsqueeze(0).expand(n, seq).contiguous()
    return {
        "tokens": tokens,
        "position_ids": positions,
        "labels": labels,
        "response_mask": response,
        "real_mask": real,
    }


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    pad_to_multiple: int = 1,
    ref_logps: Optional[Sequence[tuple[float, float]]] = None,
) -> dict[str, torch.Tensor]:
    """Collate B pairs into 2B rows (chosen first, then rejected).

    ``ref_logps`` holds, per pair, ``(chosen_sum, rejected_sum)`` of reference log-probs; the
    sums are taken as float64 and stored as a float32 ``ref_logps`` [2B] tensor.
    """
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_response_mask for p in pairs] + [p.rejected_response_mask for p in pairs]
    batch = _rows_to_tensors(rows, masks, pad_id, pad_to_multiple)
    batch["pair_index"] = torch.tensor([p.index for p in pairs], dtype=torch.int64)
    if ref_logps is not None:
        if len(ref_logps) != len(pairs):
            raise ValueError(f"{len(ref_logps)} reference scores for {len(pairs)} pairs")
        chosen = [float(c) for c, _ in ref_logps]
        rejected = [float(r) for _, r in ref_logps]
        batch["ref_logps"] = torch.tensor(chosen + rejected, dtype=torch.float64).float()
    return batch


def collate_short(
    seqs: Sequence[ShortSeq],
    pad_id: int,
    pad_to_multiple: int = 1,
    owners: Optional[Sequence[int]] = None,
) -> dict[str, torch.Tensor]:
    """Collate short reference sequences (one row each) with the same label conventions.

    ``owners[i]`` is the row (of whatever batch the caller keeps) that sequence i's log-prob sum
    belongs to; it defaults to 0..N-1 and travels as the int64 ``owner`` tensor.
    """
    ids = [s[0] for s in seqs]
    masks = [s[1] for s in seqs]
    batch = _rows_to_tensors(ids, masks, pad_id, pad_to_multiple)
    owner_list = list(range(len(seqs))) if owners is None else [int(o) for o in owners]
    if len(owner_list) != len(seqs):
        raise ValueError(f"{len(owner_list)} owners for {len(seqs)} sequences")
    batch["owner"] = torch.tensor(owner_list, dtype=torch.int64)
    return batch


def place_chosen_token_values(
    batch: dict[str, torch.Tensor], values: Sequence[torch.Tensor], key: str = "ref_token_logps"
) -> dict[str, torch.Tensor]:
    """Lay per-token values of each pair's chosen responses onto the chosen rows' response
    label positions (in order) as ``batch[key]`` ``[2B, S]`` (0 elsewhere)."""
    resp = batch["response_mask"]
    out = torch.zeros(resp.shape, dtype=torch.float32)
    for row, vals in enumerate(values):
        pos = resp[row].nonzero().squeeze(-1)
        if pos.numel() != vals.numel():
            raise ValueError(
                f"pair row {row}: {vals.numel()} values for {pos.numel()} response positions"
            )
        out[row, pos] = vals.to(torch.float32)
    return dict(batch, **{key: out})
