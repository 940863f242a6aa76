"""Asynchronous checkpoint saves: training continues while the shards are written.

Both paths use megatron-core's async contract: the save strategy returns an ``AsyncRequest``
(``async_fn`` writes the shards, ``finalize_fns`` run on every rank once all ranks finished);
``dist_checkpointing.save(..., async_sharded_save=True)`` writes the common state synchronously
and appends megatron's own metadata finalizer; :func:`longpo_megatron.checkpoint.core.save`
appends the publication (rank 0: ``paths.publish`` + prune, then a barrier).

* **GPU**: megatron's ``TorchDistSaveShardedStrategy`` (async ``torch_dist``) wrapped in
  ``FullyParallelSaveStrategyWrapper`` (replicated shards written once, spread over DP ranks),
  scheduled on megatron's ``AsyncCallsQueue`` (a forked writer process per save).
* **CPU**: :class:`CpuAsyncTorchDistSaveStrategy` copies this rank's shards (the snapshot that
  training may then overwrite) and :class:`AsyncCheckpointWriter` runs DCP's save in a
  background thread over a dedicated gloo group, so its collectives never interleave with
  training's.

Atomicity is unchanged: shards go to ``iter_X.tmp/`` and only the finalizer, after every rank's
writes, renames it and rewrites ``latest``. A process killed mid-write leaves a ``.tmp`` that no
loader accepts and the next save deletes. At most one save is in flight: a new save (and the end
of the run) first waits for the previous one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.base import AsyncSaveShardedStrategy
from torch.distributed.checkpoint import FileSystemWriter

from longpo_megatron.checkpoint.paths import CheckpointError


class CpuAsyncTorchDistSaveStrategy(AsyncSaveShardedStrategy):
    """torch_dist save as an ``AsyncRequest`` without CUDA: copy the shards now, write later.

    ``group`` carries DCP's planning collectives from the writer thread (a gloo group used by
    nothing else).
    """

    def __init__(self, group: dist.ProcessGroup, thread_count: int = 1) -> None:
        super().__init__("torch_dist", 1)
        self.group = group
        self.thread_count = thread_count

    def async_save(
        self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path
    ) -> AsyncRequest:
        """Snapshot this rank's main-replica shards; the returned request writes them."""
        sd, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        for sh in nested_values(sd):
            if isinstance(sh, ShardedTensor):
                sh.data = sh.data.detach().to("cpu", copy=True)
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sd, False)

        def write() -> None:
            dcp.save(
                pyt_state_dict,
                storage_writer=FileSystemWriter(
                    str(checkpoint_dir), thread_count=self.thread_count, sync_files=True
                ),
                planner=mcore_torch.MCoreSavePlanner(flatten_state_dict=False),
                process_group=self.group,
            )

        return AsyncRequest(write, (), [])

    @property
    def can_handle_sharded_objects(self) -> bool:  # noqa: D102
        return True


@dataclass
class PendingSave:
    """The save in flight."""

    path: Path
    """The iteration directory it publishes."""
    started: float
    """``time.perf_counter()`` when it was scheduled."""
    finalize_fns: list[Callable[[], None]]
    thread: Optional[threading.Thread] = None
    error: Optional[BaseException] = None


@dataclass(frozen=True)
class FinishedSave:
    """A published asynchronous save."""

    path: Path
    seconds: float
    """From scheduling to publication (how long the save took in total)."""


class AsyncCheckpointWriter:
    """At most one asynchronous save in flight; collective :meth:`poll` / :meth:`wait`."""

    def __init__(self, gpu: bool, thread_count: int = 1) -> None:
        self.gpu = gpu
        self.thread_count = thread_count
        self.pending: Optional[PendingSave] = None
        self._group: Optional[dist.ProcessGroup] = None
        self._queue: Any = None

    def strategy(self, dp_group: Optional[dist.ProcessGroup]) -> AsyncSaveShardedStrategy:
        """The async save strategy of this path (collective the first time on CPU)."""
        if self.gpu:
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )
            from megatron.core.dist_checkpointing.strategies.torch import (
                TorchDistSaveShardedStrategy,
            )

            base = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=self.thread_count)
            return FullyParallelSaveStrategyWrapper(base, dp_group)
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return CpuAsyncTorchDistSaveStrategy(self._group, self.thread_count)

    def schedule(self, request: AsyncRequest, path: Path) -> None:
        """Start writing ``request`` (all ranks); it is published by a later poll/wait."""
        if self.pending is not None:
            raise CheckpointError(f"{path}: a save is already in flight ({self.pending.path})")
        started = time.perf_counter()
        if self.gpu:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            if self._queue is None:
                self._queue = AsyncCallsQueue(persistent=False)
            self._queue.schedule_async_request(request)
            self.pending = PendingSave(path, started, [])
            return
        pending = PendingSave(path, started, list(request.finalize_fns))

        def run() -> None:
            try:
                request.async_fn(*request.async_fn_args, **request.async_fn_kwargs)
            except BaseException as e:  # reported on the main thread by poll/wait
                pending.error = e

        pending.thread = threading.Thread(target=run, name="longpo-ckpt-writer", daemon=True)
        self.pending = pending
        pending.thread.start()

    def _all_done(self, blocking: bool) -> bool:
        """Whether every rank's writer finished (one MIN all-reduce; collective)."""
        thread = self.pending.thread
        if blocking and thread is not None:
            thread.join()
        done = torch.tensor([int(thread is None or not thread.is_alive())], dtype=torch.int32)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def poll(self, blocking: bool = False) -> Optional[FinishedSave]:
        """Publish the save in flight when every rank has written it (collective).

        Returns it once published; None while still writing (or with nothing in flight).
        """
        pending = self.pending
        if pending is None:
            return None
        if self.gpu:
            if not self._queue.maybe_finalize_async_calls(blocking=blocking):
                return None
        else:
            if not self._all_done(blocking):
                return None
            failed = torch.tensor([int(pending.error is not None)], dtype=torch.int32)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item():
                self.pending = None
                raise CheckpointError(
                    f"{pending.path}: asynchronous save failed "
                    f"({pending.error or 'on another rank'}); the previous checkpoint stays latest"
                )
            for fn in pending.finalize_fns:
                fn()
        self.pending = None
        return FinishedSave(pending.path, time.perf_counter() - pending.started)

    def wait(self) -> Optional[FinishedSave]:
        """Block until the save in flight (if any) is written and published (collective)."""
        return self.poll(blocking=True)

    def close(self) -> None:
        """Finish the save in flight; release megatron's queue."""
        self.wait()
        if self._queue is not None:
            self._queue.close()
            self._queue = None
