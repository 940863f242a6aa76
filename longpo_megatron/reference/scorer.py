"""The frozen reference model and the distributed scoring of reference sequences.

The reference keeps the ORIGINAL RoPE θ (``model.reference_rotary_base``), has no gradients and
no optimizer state, and is built in the policy's TP/PP layout. Short prompts need no context
parallelism: the reference is built with a one-rank CP group, and CP ranks score DIFFERENT
sequences whole (sequence k of a DP rank goes to CP rank k mod CP) — no sequence is scored twice.
DP ranks take interleaved pairs. One all-reduce of the per-sequence sums gives every rank all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist

from longpo_megatron.config import Config
from longpo_megatron.data.collate import collate_short
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.distributed import ParallelGroups, without_context_parallel
from longpo_megatron.loss.layer import LossGroups
from longpo_megatron.model.gpt import ModelLayout, build_model, reference_model_config
from longpo_megatron.reference.sequences import RefItem, reference_items, view_of
from longpo_megatron.schedule.cpu_pipeline import CpuPipelineSchedule
from longpo_megatron.schedule.forward_step import make_scoring_forward_step


class ReferenceScorer:
    """Frozen reference π_ref in the policy's TP/PP layout (CP-free)."""

    def __init__(
        self,
        cfg: Config,
        layout: ModelLayout,
        groups: ParallelGroups,
        state_dict: Optional[dict[str, torch.Tensor]],
        pad_id: int,
    ) -> None:
        self.cfg, self.pad_id = cfg, pad_id
        self.dp_rank, self.dp_size = groups.dp_rank, groups.dp_size
        self.groups = without_context_parallel(groups)
        self.cp_rank, self.cp_size = groups.cp_rank, groups.cp_size
        ref_layout = dataclasses.replace(layout, cp=1)
        ref_model = reference_model_config(cfg.model)  # original RoPE θ and scaling
        self.model = build_model(ref_model, ref_layout, self.groups)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.requires_grad_(False)
        self.model.eval()
        param = next(self.model.parameters())
        self.device = param.device
        self.schedule = CpuPipelineSchedule(self.groups, param.dtype, param.device)
        self.step = make_scoring_forward_step(
            cfg.longpo.logits_chunk_size,
            LossGroups(self.groups.tp, self.groups.cp, layout.sequence_parallel),
        )
        self.pad_multiple = layout.tp if layout.sequence_parallel else 1
        self.view = view_of(cfg.longpo.loss)

    def _mine(self, items: list[RefItem], indices: Sequence[int]) -> list[int]:
        """Positions (in ``items``) this rank scores: its DP pairs, then its CP share."""
        owner = {p: k % self.dp_size for k, p in enumerate(indices)}
        mine = [k for k, it in enumerate(items) if owner[it.pair] == self.dp_rank]
        return mine[self.cp_rank :: self.cp_size]

    @torch.no_grad()
    def score_items(
        self, dataset: PreferenceDataset, indices: Sequence[int], with_tokens: bool = False
    ) -> tuple[list[RefItem], torch.Tensor, Optional[list[torch.Tensor]]]:
        """Σ response log-probs of every item of ``indices`` (float64, same on every rank);
        with ``with_tokens`` also each item's per-response-token log-probs."""
        items = reference_items(dataset, indices, self.view)
        outs = self._forward(items, self._mine(items, indices))
        sums = torch.zeros(len(items), dtype=torch.float64, device=self.device)
        counts = [sum(int(m) for m in it.seq[1][1:]) for it in items]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        flat = torch.zeros(
            offsets[-1] if with_tokens else 0, dtype=torch.float64, device=self.device
        )
        if self.groups.is_last_stage and self.groups.tp_rank == 0:
            for out in outs:
                sums.index_add_(0, out["owner"], out["logps"].double())
                for row, k in enumerate(out["owner"].tolist()):
                    if with_tokens:
                        vals = out["tokens"][row][out["mask"][row].bool()].double()
                        flat[offsets[k] : offsets[k + 1]] = vals
        dist.all_reduce(sums)
        if not with_tokens:
            return items, sums.cpu(), None
        dist.all_reduce(flat)
        flat = flat.cpu()
        return items, sums.cpu(), [flat[offsets[k] : offsets[k + 1]] for k in range(len(items))]

    def _forward(self, items: list[RefItem], mine: list[int]) -> list[dict]:
        mbs = self.cfg.reference.micro_batch_size
        batches = []
        for lo in range(0, len(mine), mbs):
            part = mine[lo : lo + mbs]
            batch = collate_short(
                [items[k].seq for k in part], self.pad_id, self.pad_multiple, part
            )
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return self.schedule(
            forward_step_func=self.step,
            data_iterator=iter(batches),
            model=self.model,
            num_microbatches=len(batches),
            forward_only=True,
        )

    def fill(self, dataset: PreferenceDataset, indices: Sequence[int]) -> None:
        """Score ``indices`` and store their per-pair sums (and, for ``loss=sft_kl``, the chosen
        responses' per-token log-probs) in ``dataset``."""
        with_tokens = self.cfg.longpo.loss == "sft_kl"
        items, sums, tokens = self.score_items(dataset, indices, with_tokens)
        for pair, (chosen, rejected) in pair_sums(items, sums).items():
            dataset.set_ref_logps(pair, chosen, rejected)
        if tokens is not None:
            for pair, values in chosen_tokens(items, tokens).items():
                dataset.set_ref_token_logps(pair, values)


def pair_sums(items: list[RefItem], sums: torch.Tensor) -> dict[int, tuple[float, float]]:
    """Per pair: (Σ chosen turns, Σ rejected turns)."""
    out: dict[int, list[float]] = {}
    for item, value in zip(items, sums.tolist()):
        out.setdefault(item.pair, [0.0, 0.0])[item.side] += value
    return {p: (c, r) for p, (c, r) in out.items()}


def chosen_tokens(items: list[RefItem], tokens: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per pair: the chosen responses' per-token log-probs, turns concatenated in order."""
    out: dict[int, list[torch.Tensor]] = {}
    for item, values in zip(items, tokens):
        if item.side == 0:
            out.setdefault(item.pair, []).append(values)
    return {p: torch.cat(v) for p, v in out.items()}
