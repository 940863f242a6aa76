"""Non-finite training: stop a diverged run with one clear message, never save NaN weights.

The engines skip an update whose global gradient norm is non-finite. One such step is noise; a
streak means the run diverged and every further step (and checkpoint) is wasted or harmful:
with ``checkpoint.keep_last`` a run saving NaN weights would prune the last good checkpoints.
:class:`NonFiniteGuard` counts consecutive skipped steps and stops the run after
``train.max_nonfinite_steps``; :func:`weights_finite` is checked (collectively) before every save.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist

from longpo_megatron.errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """Training produced non-finite values; the message says where and what to change."""


class NonFiniteGuard:
    """Counts consecutive steps with non-finite gradients (same verdict on every rank)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak = 0
        """Consecutive skipped steps so far."""
        self.first_step: Optional[int] = None
        """The first step of the current streak."""

    def update(self, step: int, skipped: bool, grad_norm: float) -> None:
        """Record step ``step``; raise :class:`NonFiniteError` when the streak hits the limit."""
        if not skipped:
            self.streak, self.first_step = 0, None
            return
        self.streak += 1
        if self.first_step is None:
            self.first_step = step
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"training diverged: {self.streak} consecutive steps ({self.first_step}..{step}) "
                f"had non-finite gradients (grad norm {grad_norm}); stopped without saving "
                f"(train.max_nonfinite_steps={self.limit}). Lower optim.lr, check the data, or "
                "resume from the last checkpoint"
            )


def weights_finite(params: Iterable[torch.Tensor], group: Optional[dist.ProcessGroup]) -> bool:
    """True on every rank when every rank's tensors are finite (collective over ``group``)."""
    bad = torch.zeros((), dtype=torch.float32)
    for p in params:
        bad = torch.maximum(bad, (~torch.isfinite(p.detach())).any().float().cpu())
    if dist.is_initialized():
        device = "cpu"
        if dist.get_backend(group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        flag = bad.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        bad = flag.cpu()
    return not bool(bad.item())


def refuse_nonfinite_save(
    params: Iterable[torch.Tensor], step: int, group: Optional[dist.ProcessGroup] = None
) -> None:
    """Raise :class:`NonFiniteError` (on every rank) instead of saving non-finite weights."""
    if not weights_finite(params, group):
        raise NonFiniteError(
            f"refusing to save the checkpoint of step {step}: the weights hold NaN/inf "
            "(earlier checkpoints are kept); lower optim.lr or check the data"
        )
