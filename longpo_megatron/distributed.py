"""Distributed start-up: the ONLY module that touches megatron's global ``parallel_state``.

Everything else receives a :class:`ParallelGroups` and passes groups explicitly, as megatron-core's
``ProcessGroupCollection`` intends.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass
class ParallelGroups:
    """Process groups and this rank's coordinates in the TP × CP × DP × PP grid."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    mp: dist.ProcessGroup
    pg_collection: ProcessGroupCollection
    """megatron-core's collection, handed to model constructors."""
    pp_next_rank: Optional[int]
    """Global rank of the next pipeline stage (None on the last stage)."""
    pp_prev_rank: Optional[int]
    """Global rank of the previous pipeline stage (None on the first stage)."""

    @property
    def tp_rank(self) -> int:
        return self.tp.rank()

    @property
    def tp_size(self) -> int:
        return self.tp.size()

    @property
    def pp_rank(self) -> int:
        return self.pp.rank()

    @property
    def pp_size(self) -> int:
        return self.pp.size()

    @property
    def cp_rank(self) -> int:
        return self.cp.rank()

    @property
    def cp_size(self) -> int:
        return self.cp.size()

    @property
    def dp_rank(self) -> int:
        return self.dp.rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """One rank that holds the loss: last stage, first of its TP/CP/DP groups."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0


def init_process_group(backend: str, timeout_minutes: int) -> None:
    """Initialise torch.distributed from torchrun's env (a 1-rank group when launched plainly)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(tp: int, pp: int, cp: int) -> ParallelGroups:
    """Create megatron's groups (order tp-cp-ep-dp-pp) and return them explicitly."""
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
        )
    ps = parallel_state
    pp_group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(pp_group)
    stage = dist.get_rank(pp_group)
    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        pp=pp_group,
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        mp=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        pp_next_rank=ranks[stage + 1] if stage + 1 < len(ranks) else None,
        pp_prev_rank=ranks[stage - 1] if stage > 0 else None,
    )


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_all(seed: int, groups: ParallelGroups, cuda: bool) -> None:
    """Seed torch so every TP/DP/CP replica of a pipeline stage initialises identical weights.

    CPU initialisation builds each full weight then slices it per TP rank, so replicas share a
    seed; pipeline stages get distinct seeds (``seed + 100 * pp_rank``, as megatron does).
    """
    stage_seed = seed + 100 * groups.pp_rank
    torch.manual_seed(stage_seed)
    if cuda:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def without_context_parallel(groups: ParallelGroups) -> ParallelGroups:
    """The same TP/PP/DP layout with a one-rank CP group (collective: call on every rank).

    Short reference prompts need no context parallelism: CP ranks score different sequences
    whole instead of splitting each one.
    """
    import copy
    import dataclasses

    if groups.cp_size == 1:
        return groups
    single, _ = dist.new_subgroups(group_size=1)
    pgc = copy.copy(groups.pg_collection)
    pgc.cp = single
    pgc.tp_cp = groups.tp
    return dataclasses.replace(groups, cp=single, dp_cp=groups.dp, pg_collection=pgc)
