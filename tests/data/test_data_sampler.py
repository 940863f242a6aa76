"""Sampler: determinism, epoch wrap-around, DP slicing, exact resume."""

from __future__ import annotations

import pytest

from longpo_megatron.data.sampler import PairSampler, slice_for_dp


def draw(sampler: PairSampler, steps: int, gbs: int) -> list[list[int]]:
    return [sampler.next_global_batch(gbs) for _ in range(steps)]


def test_deterministic_and_seeded() -> None:
    a, b = draw(PairSampler(10, seed=1), 7, 4), draw(PairSampler(10, seed=1), 7, 4)
    assert a == b
    assert a != draw(PairSampler(10, seed=2), 7, 4)
    assert draw(PairSampler(5, seed=1, shuffle=False), 2, 3) == [[0, 1, 2], [3, 4, 0]]


def test_epochs_are_permutations_and_wrap() -> None:
    sampler = PairSampler(6, seed=3)
    flat = sum(draw(sampler, 6, 4), [])  # 24 draws = 4 full epochs
    epochs = [flat[i : i + 6] for i in range(0, 24, 6)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert (sampler.epoch, sampler.position, sampler.consumed) == (4, 0, 24)
    assert epochs[2] == sampler.epoch_order(2)


def test_dp_slices_cover_global_batch_once() -> None:
    batch = PairSampler(20, seed=0).next_global_batch(12)
    for dp in (1, 2, 3, 4, 6, 12):
        slices = [slice_for_dp(batch, r, dp) for r in range(dp)]
        assert sum(slices, []) == batch
        assert all(len(s) == 12 // dp for s in slices)
    assert PairSampler.slice_for_dp(batch, 1, 2) == batch[6:]
    with pytest.raises(ValueError, match="evenly"):
        slice_for_dp(batch, 0, 5)
    with pytest.raises(ValueError, match="DP"):
        slice_for_dp(batch, 2, 2)


def test_resume_continues_exactly() -> None:
    ref = PairSampler(7, seed=11)
    draw(ref, 3, 5)
    state = ref.state_dict()
    expect = draw(ref, 6, 5)
    resumed = PairSampler(7, seed=11)
    resumed.load_state_dict(dict(state))
    assert draw(resumed, 6, 5) == expect
    with pytest.raises(ValueError, match="n=7"):
        PairSampler(8, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PairSampler(7, seed=12).load_state_dict(state)
