"""A small pipeline schedule over ``torch.distributed`` send/recv (gloo-capable).

megatron's ``get_forward_backward_func`` allocates CUDA buffers and synchronises CUDA, so the CPU
engine uses this instead. It honours the same call contract (keyword arguments, forward_step
contract, loss scaling ``× cp_size ÷ num_microbatches``, returned per-micro-batch metric dicts on
the last stage) so everything above the schedule is shared with the GPU path.

Order: all forwards, then all backwards (GPipe). Activation shapes are sent ahead of each
tensor, so micro-batches may have different sequence lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.schedule.forward_step import ForwardStep


def _send(t: Tensor, dst: int) -> None:
    dist.send(torch.tensor(t.shape, dtype=torch.int64), dst)
    dist.send(t.contiguous(), dst)


def _recv(src: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    shape = torch.empty(3, dtype=torch.int64)
    dist.recv(shape, src)
    buf = torch.empty(tuple(shape.tolist()), dtype=dtype, device=device)
    dist.recv(buf, src)
    return buf


class CpuPipelineSchedule:
    """Callable with the keyword contract of megatron's forward-backward functions."""

    def __init__(self, groups: ParallelGroups, dtype: torch.dtype, device: torch.device) -> None:
        self.groups = groups
        self.dtype = dtype
        self.device = device

    def __call__(
        self,
        *,
        forward_step_func: ForwardStep,
        data_iterator: Iterator,
        model: torch.nn.Module,
        num_microbatches: int,
        seq_length: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
        forward_only: bool = False,
        **_unused: Any,
    ) -> list[dict[str, Tensor]]:
        with torch.set_grad_enabled(not forward_only):
            saved, outputs = self._forward_all(
                forward_step_func, data_iterator, model, num_microbatches, forward_only
            )
        if not forward_only:
            self._backward_all(saved)
        return outputs

    def _forward_all(self, step, data_iterator, model, n, forward_only):
        g = self.groups
        saved: list[tuple[Optional[Tensor], Tensor]] = []
        outputs: list[dict[str, Tensor]] = []
        for _ in range(n):
            inp = None
            if not g.is_first_stage:
                inp = _recv(g.pp_prev_rank, self.dtype, self.device).requires_grad_(
                    not forward_only
                )
                model.set_input_tensor(inp)
            out, loss_func = step(data_iterator, model)
            if g.is_last_stage:
                loss, metrics = loss_func(out)
                out = loss * g.cp_size / n
                outputs.append(metrics)
            else:
                _send(out.detach(), g.pp_next_rank)
            saved.append((inp, out))
        return saved, outputs

    def _backward_all(self, saved: list[tuple[Optional[Tensor], Tensor]]) -> None:
        g = self.groups
        for inp, out in saved:
            if g.is_last_stage:
                torch.autograd.backward(out)
            else:
                grad = _recv(g.pp_next_rank, out.dtype, out.device)
                torch.autograd.backward(out, grad)
            if not g.is_first_stage:
                _send(inp.grad, g.pp_prev_rank)
