"""Collation against the micro-batch contract, on a hand-made example."""

from __future__ import annotations

import torch

from longpo_megatron.data.collate import collate_pairs, collate_short, padded_length
from longpo_megatron.data.tokenize import TokenizedPair

F, T = False, True


def pairs() -> list[TokenizedPair]:
    return [
        TokenizedPair(7, [1, 2, 3], [1, 4], [F, T, T], [F, T]),
        TokenizedPair(3, [1, 5, 6, 7, 8], [1, 9, 10], [F, F, T, T, T], [F, T, F]),
    ]


def test_collate_pairs_by_hand() -> None:
    batch = collate_pairs(
        pairs(), pad_id=0, pad_to_multiple=4, ref_logps=[(-1.5, -2.5), (-3.0, -4.0)]
    )
    # Rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1.
    assert batch["tokens"].tolist() == [
        [1, 2, 3, 0, 0, 0, 0, 0],
        [1, 5, 6, 7, 8, 0, 0, 0],
        [1, 4, 0, 0, 0, 0, 0, 0],
        [1, 9, 10, 0, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [2, 3, 0, 0, 0, 0, 0, 0],
        [5, 6, 7, 8, 0, 0, 0, 0],
        [4, 0, 0, 0, 0, 0, 0, 0],
        [9, 10, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["response_mask"].tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["real_mask"].tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [list(range(8))] * 4
    assert batch["pair_index"].tolist() == [7, 3]
    assert batch["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    assert batch["ref_logps"].dtype == torch.float32
    for key in ("tokens", "labels", "position_ids", "pair_index"):
        assert batch[key].dtype == torch.int64
    for key in ("response_mask", "real_mask"):
        assert batch[key].dtype == torch.float32


def test_collate_pairs_minimal_padding_and_no_ref() -> None:
    batch = collate_pairs(pairs(), pad_id=99)
    assert batch["tokens"].shape == (4, 5) and "ref_logps" not in batch
    assert batch["labels"][2].tolist() == [4, 99, 99, 99, 99]
    assert batch["tokens"][2].tolist() == [1, 4, 99, 99, 99]
    assert padded_length(5, 4) == 8 and padded_length(8, 4) == 8 and padded_length(1, 1) == 1


def test_collate_short() -> None:
    seqs = [([1, 2, 3], [F, T, T]), ([4, 5], [F, T])]
    batch = collate_short(seqs, pad_id=0, pad_to_multiple=2, owners=[3, 1])
    assert batch["tokens"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 0, 0], [5, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["real_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert batch["owner"].tolist() == [3, 1] and batch["owner"].dtype == torch.int64
    assert collate_short(seqs, pad_id=0)["owner"].tolist() == [0, 1]
