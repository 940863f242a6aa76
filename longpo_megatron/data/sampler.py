"""Deterministic, resumable order over dataset indices.

Each epoch is a permutation seeded by (seed, epoch) (or the identity when not shuffling). Global
batches are consecutive runs of that order and wrap seamlessly into the next epoch. Every DP rank
builds the same sampler, draws the same global batch and keeps its own contiguous slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def slice_for_dp(indices: list[int], dp_rank: int, dp_size: int) -> list[int]:
    """The contiguous slice of a global batch that DP rank ``dp_rank`` of ``dp_size`` owns."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad DP coordinates rank={dp_rank} size={dp_size}")
    if len(indices) % dp_size:
        raise ValueError(
            f"global batch of {len(indices)} pairs does not split evenly over {dp_size} DP ranks"
        )
    per_rank = len(indices) // dp_size
    return list(indices[dp_rank * per_rank : (dp_rank + 1) * per_rank])


class PairSampler:
    """Epoch-based order over ``n`` pairs; ``state_dict`` resumes it exactly."""

    STATE_VERSION = 1

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError(f"sampler needs at least one pair, got n={n}")
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        """Next unread slot of the current epoch's order."""
        self._order_epoch = -1
        self._order: list[int] = []

    def epoch_order(self, epoch: int) -> list[int]:
        """The permutation used in ``epoch`` (pure function of n, seed, shuffle, epoch)."""
        if not self.shuffle:
            return list(range(self.n))
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return [int(i) for i in rng.permutation(self.n)]

    def _current_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def next_global_batch(self, global_batch_size: int) -> list[int]:
        """The next ``global_batch_size`` dataset indices, wrapping into later epochs."""
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        out: list[int] = []
        while len(out) < global_batch_size:
            order = self._current_order()
            take = min(global_batch_size - len(out), self.n - self.position)
            out += order[self.position : self.position + take]
            self.position += take
            if self.position == self.n:
                self.epoch += 1
                self.position = 0
        return out

    slice_for_dp = staticmethod(slice_for_dp)

    @property
    def consumed(self) -> int:
        """Pairs drawn since the start (all epochs)."""
        return self.epoch * self.n + self.position

    def state_dict(self) -> dict[str, Any]:
        """Plain-int state for checkpoints."""
        return {
            "version": self.STATE_VERSION,
            "n": self.n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; refuses a state from a different data set size, seed or shuffle setting."""
        for key in ("n", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this run has "
                    f"{getattr(self, key)!r}; resuming would not continue the same order"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.n:
            raise ValueError(f"bad sampler state epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
