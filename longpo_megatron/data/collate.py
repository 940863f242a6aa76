"""Collation into the micro-batch contract of docs/design.md.

B pairs become 2B rows (rows 0..B-1 chosen, rows B..2B-1 rejected), right-padded to S, a multiple
of ``pad_to_multiple``. Every mask is about LABELS: ``labels[:, t] = tokens[:, t+1]``, so
``response_mask[t]`` says token t+1 is a response token and ``real_mask[t]`` says it is real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from longpo_megatron.data.records import RecordError
from longpo_megatron.data.tokenize import ShortSeq, TokenizedPair, shared_prefix_length


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
    _add_pair_fields(batch, pairs, ref_logps)
    return batch


def _add_pair_fields(
    batch: dict[str, torch.Tensor],
    pairs: Sequence[TokenizedPair],
    ref_logps: Optional[Sequence[tuple[float, float]]],
) -> None:
    """``pair_index`` [B] and, when scored, ``ref_logps`` [2B] (chosen sums, then rejected)."""
    batch["pair_index"] = torch.tensor([p.index for p in pairs], dtype=torch.int64)
    if ref_logps is not None:
        if len(ref_logps) != len(pairs):
            raise ValueError(f"{len(ref_logps)} reference scores for {len(pairs)} pairs")
        chosen = [float(c) for c, _ in ref_logps]
        rejected = [float(r) for _, r in ref_logps]
        batch["ref_logps"] = torch.tensor(chosen + rejected, dtype=torch.float64).float()


def packed_prefix_length(pair: TokenizedPair) -> int:
    """The shared-prefix length the packed layout uses for ``pair``: the stored one (prepared
    datasets, tokenization), checked against the tokens, or computed when none is stored.
    A stored length that disagrees with the tokens is refused naming the record: packing
    with it would hand one branch's tokens to the other."""
    k = shared_prefix_length(pair)
    if pair.shared_prefix is not None and pair.shared_prefix != k:
        raise RecordError(
            "shared_prefix",
            f"stored shared-prefix length {pair.shared_prefix} disagrees with its tokens "
            f"(chosen and rejected share {k} prompt tokens before their branches); the "
            "prepared data is stale or corrupted: prepare it again with longpo-preprocess",
            record_id=pair.record_id or f"pair {pair.index}",
        )
    return k


def _packed_row(pair: TokenizedPair) -> tuple[list[int], list[bool], list[int], list[int]]:
    """One pair as [shared | chosen branch | rejected branch]: ids, per-token response mask,
    position ids (both branches continue from the shared part) and branch ids (0/1/2)."""
    k = packed_prefix_length(pair)
    c, r = len(pair.chosen) - k, len(pair.rejected) - k
    ids = pair.chosen + pair.rejected[k:]
    mask = pair.chosen_response_mask + pair.rejected_response_mask[k:]
    positions = list(range(k + c)) + list(range(k, k + r))
    branch = [0] * k + [SHARED_CHOSEN] * c + [SHARED_REJECTED] * r
    return ids, mask, positions, branch


SHARED_CHOSEN = 1
"""Branch id of the chosen branch in the packed layout (0 = the shared prompt)."""
SHARED_REJECTED = 2
"""Branch id of the rejected branch (padding joins it: nothing real attends to padding)."""


def collate_shared_prefix(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    pad_to_multiple: int = 1,
    ref_logps: Optional[Sequence[tuple[float, float]]] = None,
) -> dict[str, torch.Tensor]:
    """Collate B pairs into B packed rows ``[shared prompt | chosen branch | rejected branch]``
    (``data.shared_prefix``; layout in docs/design.md). Labels never cross a branch boundary:
    each branch's last token has no label. ``branch`` [B, S] says which branch each token (and
    so each label position) is in; ``ref_logps`` keeps the two-sequence [2B] order."""
    packed = [_packed_row(p) for p in pairs]
    batch = _rows_to_tensors(
        [p[0] for p in packed], [p[1] for p in packed], pad_id, pad_to_multiple
    )
    seq = batch["tokens"].shape[1]
    branch = torch.full((len(pairs), seq), SHARED_REJECTED, dtype=torch.int64)
    for row, (ids, _, positions, br) in enumerate(packed):
        n = len(ids)
        branch[row, :n] = torch.tensor(br, dtype=torch.int64)
        tail = positions[-1] + 1
        batch["position_ids"][row] = torch.tensor(
            positions + list(range(tail, tail + seq - n)), dtype=torch.int64
        )
        cut = len(pairs[row].chosen) - 1  # last chosen token: its label is not the next token
        batch["labels"][row, cut] = pad_id
        batch["response_mask"][row, cut] = 0.0
        batch["real_mask"][row, cut] = 0.0
    batch["branch"] = branch
    _add_pair_fields(batch, pairs, ref_logps)
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
    label positions (in order) as ``batch[key]`` ``[2B, S]`` (0 elsewhere); on packed rows
    (``branch`` present) onto the chosen branch's, as ``[B, S]``."""
    resp = batch["response_mask"]
    if "branch" in batch:  # packed rows: the chosen branch's responses only
        resp = resp * (batch["branch"] == SHARED_CHOSEN)
    out = torch.zeros(resp.shape, dtype=torch.float32)
    for row, vals in enumerate(values):
        pos = resp[row].nonzero().squeeze(-1)
        if pos.numel() != vals.numel():
            raise ValueError(
                f"pair row {row}: {vals.numel()} values for {pos.numel()} response positions"
            )
        out[row, pos] = vals.to(torch.float32)
    return dict(batch, **{key: out})
