"""Reference log-probs Σ_i log π_ref(y_i | x_S,i) for every pair, scored once before training.

``reference.mode=initial_policy``: the frozen reference is the initial policy's weights with the
ORIGINAL RoPE θ (``model.reference_rotary_base``), run forward-only through the same pipeline
schedule and loss-layer log-prob code as training. For ``loss=longpo`` it sees each turn's SHORT
prompt (chunk + instruction); for ``loss=dpo`` it sees the LONG prompt, which is plain DPO.
DP ranks score disjoint slices; one all-reduce gives every rank the whole table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from longpo_megatron.config import Config
from longpo_megatron.context_parallel import split_batch
from longpo_megatron.data.collate import collate_short
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.tokenize import ShortSeq
from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.loss.layer import LossGroups
from longpo_megatron.model.gpt import ModelLayout, build_model
from longpo_megatron.schedule.cpu_pipeline import CpuPipelineSchedule
from longpo_megatron.schedule.forward_step import make_scoring_forward_step, unwrap


def reference_sequences(
    dataset: PreferenceDataset, indices: Sequence[int], loss: str
) -> tuple[list[ShortSeq], list[int]]:
    """Sequences the reference scores and their owners (2·pair = chosen, 2·pair+1 = rejected)."""
    seqs: list[ShortSeq] = []
    owners: list[int] = []
    for i in indices:
        pair = dataset[i]
        if loss == "dpo":
            seqs += [(pair.chosen, pair.chosen_response_mask)]
            seqs += [(pair.rejected, pair.rejected_response_mask)]
            owners += [2 * i, 2 * i + 1]
            continue
        for seq in pair.ref_chosen:
            seqs.append(seq)
            owners.append(2 * i)
        for seq in pair.ref_rejected:
            seqs.append(seq)
            owners.append(2 * i + 1)
    return seqs, owners


def score_reference(
    policy: torch.nn.Module,
    cfg: Config,
    layout: ModelLayout,
    groups: ParallelGroups,
    dataset: PreferenceDataset,
    pad_id: int,
    pad_to_multiple: int,
) -> None:
    """Fill ``dataset``'s reference table using a frozen copy of ``policy``'s initial weights."""
    base = cfg.model.reference_rotary_base or cfg.model.rotary_base
    ref = build_model(cfg.model, layout, groups, rotary_base=base)
    ref.load_state_dict(unwrap(policy).state_dict())
    ref.requires_grad_(False)
    ref.eval()
    param = next(ref.parameters())
    schedule = CpuPipelineSchedule(groups, param.dtype, param.device)
    mine = list(range(groups.dp_rank, len(dataset), groups.dp_size))
    seqs, owners = reference_sequences(dataset, mine, cfg.longpo.loss)
    step = make_scoring_forward_step(
        cfg.longpo.logits_chunk_size, LossGroups(groups.tp, groups.cp, layout.sequence_parallel)
    )
    mbs = cfg.reference.micro_batch_size
    batches = [
        _to(
            split_batch(
                collate_short(seqs[lo : lo + mbs], pad_id, pad_to_multiple, owners[lo : lo + mbs]),
                groups.cp_rank,
                groups.cp_size,
            ),
            param.device,
        )
        for lo in range(0, len(seqs), mbs)
    ]
    with torch.no_grad():
        outs = schedule(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=ref,
            num_microbatches=len(batches),
            forward_only=True,
        )
    table = torch.zeros(2 * len(dataset), dtype=torch.float64, device=param.device)
    if groups.is_last_stage and groups.tp_rank == 0 and groups.cp_rank == 0:
        for out in outs:
            table.index_add_(0, out["owner"].to(param.device), out["logps"].double())
    dist.all_reduce(table)
    for i, (c, r) in enumerate(table.view(-1, 2).tolist()):
        dataset.set_ref_logps(i, c, r)
    del ref


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
