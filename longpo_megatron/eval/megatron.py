"""Evaluating the project model in its TP/PP/CP layout: a Megatron checkpoint or the live policy.

One forward step serves both modes. On the last pipeline stage it takes the positions marked by
``response_mask`` (label-aligned, as in training) and returns per row the summed label
log-probabilities (the chunked vocab-parallel ones of the loss), how many labels are not the
argmax, and the argmax itself (vocab-parallel: each TP rank's best, then the best of those).
Sums are all-reduced over CP, so a context-parallel split gives the same numbers.

- ``loglik``: rows are (prompt + answer + end of turn) with the answer marked;
- ``generate``: greedy decoding without a KV cache; each step re-runs the whole sequence with
  only its last position marked and appends the argmax (simple and exact; for long answers at
  long lengths export to HF and use the ``vllm`` backend).

DP ranks take interleaved rows; one all-reduce over the world gives every rank every result, so
the caller (the CLI or the training loop) sees the same values on all ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from torch import Tensor

from longpo_megatron.context_parallel import split_batch
from longpo_megatron.data.collate import collate_short
from longpo_megatron.data.tokenizer import ChatTokenizer
from longpo_megatron.distributed import ParallelGroups
from longpo_megatron.eval.render import Row, prompt_ids
from longpo_megatron.loss.layer import LossGroups
from longpo_megatron.loss.logprobs import token_logprobs
from longpo_megatron.schedule.cpu_pipeline import CpuPipelineSchedule
from longpo_megatron.schedule.forward_step import Batch, _run_model, unwrap


def vocab_parallel_argmax(
    h: Tensor, weight: Tensor, tp_group: dist.ProcessGroup, vocab_limit: Optional[int] = None
) -> Tensor:
    """Global argmax token of ``h [N, hidden] @ weight.T`` for a vocab-sharded ``weight``;
    ties go to the lowest id, as ``torch.argmax`` over the full logits. Ids from
    ``vocab_limit`` on (vocabulary padding the tokenizer cannot decode) are never chosen."""
    logits = (h @ weight.t()).float()
    start = tp_group.rank() * weight.shape[0]
    if vocab_limit is not None:
        ids = torch.arange(start, start + weight.shape[0], device=logits.device)
        logits = logits.masked_fill(ids >= vocab_limit, float("-inf"))
    value, index = logits.max(dim=-1)
    index = index + start
    if tp_group.size() == 1:
        return index
    values = [torch.empty_like(value) for _ in range(tp_group.size())]
    indices = [torch.empty_like(index) for _ in range(tp_group.size())]
    dist.all_gather(values, value, group=tp_group)
    dist.all_gather(indices, index, group=tp_group)
    best = torch.stack(values).argmax(dim=0)  # first maximum = lowest rank = lowest id
    return torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)


def _row_stats(
    hidden: Tensor, batch: Batch, weight: Tensor, chunk: int, g: LossGroups, limit: Optional[int]
) -> Tensor:
    """``[rows, 3]`` float64: Σ label log-probs, non-argmax labels, Σ argmax ids (marked ones)."""
    select = batch["response_mask"].bool()
    labels = batch["labels"]
    logp = token_logprobs(hidden, weight, labels, select, chunk, g.tp, g.sequence_parallel)
    if g.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=g.tp)
    b_idx, s_idx = select.nonzero(as_tuple=True)
    best = vocab_parallel_argmax(hidden[s_idx, b_idx], weight, g.tp, limit)
    rows = labels.shape[0]
    wrong = torch.zeros(rows, dtype=torch.float64, device=labels.device)
    wrong.index_add_(0, b_idx, (best != labels[b_idx, s_idx]).double())
    argmax = torch.zeros(rows, dtype=torch.float64, device=labels.device)
    argmax.index_add_(0, b_idx, best.double())
    stats = torch.stack([logp.double().sum(-1), wrong, argmax], dim=1)
    if g.cp.size() > 1:
        dist.all_reduce(stats, group=g.cp)
    return stats


def make_eval_forward_step(chunk_size: int, groups: LossGroups, vocab_limit: Optional[int] = None):
    """forward_step whose last stage yields ``{"stats": [rows, 3], "owner": [rows]}``."""

    def loss_func(batch: Batch, model: torch.nn.Module, hidden: Tensor):
        weight = unwrap(model).output_weight()
        stats = _row_stats(hidden, batch, weight, chunk_size, groups, vocab_limit)
        return hidden.sum() * 0.0, {"stats": stats, "owner": batch["owner"]}

    def forward_step(data_iterator, model: torch.nn.Module):
        batch = next(data_iterator)
        return _run_model(model, batch), partial(loss_func, batch, model)

    return forward_step


class MegatronEvaluator:
    """The project model (any TP/PP/CP/DP layout) as an :class:`~.backends.Evaluator`."""

    def __init__(
        self,
        model: torch.nn.Module,
        groups: ParallelGroups,
        tokenizer: ChatTokenizer,
        *,
        seq_multiple: int = 1,
        sequence_parallel: bool = False,
        micro_batch_size: int = 1,
        chunk_size: int = 1024,
        describe: Optional[dict[str, Any]] = None,
    ) -> None:
        self.model, self.groups, self.tokenizer = model, groups, tokenizer
        self.seq_multiple = max(seq_multiple, 2 * groups.cp_size if groups.cp_size > 1 else 1)
        self.micro_batch_size = micro_batch_size
        param = next(model.parameters())
        self.device = param.device
        self.schedule = CpuPipelineSchedule(groups, param.dtype, param.device)
        loss_groups = LossGroups(groups.tp, groups.cp, sequence_parallel)
        self.step = make_eval_forward_step(chunk_size, loss_groups, tokenizer.vocab_size)
        self._describe = describe or {}

    def describe(self) -> dict[str, Any]:
        """Checkpoint, layout and settings."""
        g = self.groups
        layout = {"tp": g.tp_size, "pp": g.pp_size, "cp": g.cp_size, "dp": g.dp_size}
        return {"backend": "megatron", **self._describe, "layout": layout}

    @torch.no_grad()
    def _stats(self, rows: Sequence[Row]) -> Tensor:
        """``[len(rows), 3]`` stats of every row, the same on every rank (collective)."""
        g = self.groups
        mine = [k for k in range(len(rows)) if k % g.dp_size == g.dp_rank]
        batches = []
        for lo in range(0, len(mine), self.micro_batch_size):
            part = mine[lo : lo + self.micro_batch_size]
            batch = collate_short(
                [rows[k] for k in part], self.tokenizer.pad_id, self.seq_multiple, part
            )
            batch = split_batch(batch, g.cp_rank, g.cp_size)
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        was_training = self.model.training
        self.model.eval()
        try:
            outs = self.schedule(
                forward_step_func=self.step,
                data_iterator=iter(batches),
                model=self.model,
                num_microbatches=len(batches),
                forward_only=True,
            )
        finally:
            self.model.train(was_training)
        table = torch.zeros((len(rows), 3), dtype=torch.float64, device=self.device)
        if g.is_last_stage and g.tp_rank == 0 and g.cp_rank == 0:
            for out in outs:
                table.index_add_(0, out["owner"], out["stats"])
        dist.all_reduce(table)
        return table.cpu()

    def loglik(self, rows: Sequence[Row]) -> list[tuple[float, bool]]:
        """Σ log p(response tokens) per row and whether all are the argmax."""
        table = self._stats(rows)
        return [(float(t[0]), bool(t[1] == 0)) for t in table]

    def generate_ids(self, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (ids, end of turn excluded) of token prompts."""
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        eos = self.tokenizer.eos_id
        for _ in range(max_new_tokens):
            if not active:
                break
            rows = [(seqs[k] + [eos], [False] * len(seqs[k]) + [True]) for k in active]
            nxt = self._stats(rows)[:, 2].long().tolist()
            still = []
            for k, token in zip(active, nxt):
                if token != eos:
                    seqs[k].append(token)
                    new[k].append(token)
                    still.append(k)
            active = still
        return new

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy answers of chat-rendered prompts."""
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        outs = self.generate_ids(ids, max_new_tokens)
        return [self.tokenizer.decode(t, skip_special=True) for t in outs]  # type: ignore[call-arg]

    def close(self) -> None:
        """Nothing to free beyond the model the caller owns."""


def _checkpoint_tokenizer(ckpt: Any, common: dict[str, Any], explicit: Optional[str]) -> str:
    """``megatron.tokenizer``, else ``<root>/hf`` with tokenizer files, else the run's own."""
    from pathlib import Path

    if explicit:
        return explicit
    assets = Path(ckpt).parent / "hf"
    if (assets / "tokenizer_config.json").is_file() or (assets / "tokenizer.json").is_file():
        return str(assets)
    run_tok = ((common.get("config") or {}).get("data") or {}).get("tokenizer")
    if isinstance(run_tok, str) and run_tok:
        return run_tok
    from longpo_megatron.eval.backends import EvalConfigError

    raise EvalConfigError(
        f"{ckpt}: no tokenizer found (no hf/ directory beside it, no data.tokenizer in its "
        "config): set megatron.tokenizer=byte or a local tokenizer directory"
    )


def load_checkpoint(path: str, cfg: Any) -> MegatronEvaluator:
    """Start process groups (torchrun's world, or one rank), build the model in the layout of
    ``cfg`` (a MegatronEvalConfig) and load the checkpoint's weights into it."""
    from longpo_megatron import checkpoint, distributed
    from longpo_megatron.config_validation import te_available
    from longpo_megatron.data.tokenizer import build_tokenizer
    from longpo_megatron.eval.backends import EvalConfigError
    from longpo_megatron.export import megatron_io as mio
    from longpo_megatron.export.cli import load_model_yaml
    from longpo_megatron.export.convert import _export_model_config
    from longpo_megatron.model.gpt import ModelLayout, build_model

    ckpt = checkpoint.resolve(path)
    common = mio.read_common(ckpt)
    explicit = load_model_yaml(cfg.model_config) if cfg.model_config else None
    m = _export_model_config(common, None, explicit)
    tokenizer = build_tokenizer(_checkpoint_tokenizer(ckpt, common, cfg.tokenizer))
    if tokenizer.vocab_size > m.vocab_size:
        raise EvalConfigError(
            f"megatron.tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the "
            f"checkpoint's model has vocab_size {m.vocab_size}: not the model's tokenizer"
        )
    tp, pp, cp = (
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        cfg.context_parallel_size,
    )
    gpu = torch.cuda.is_available()
    distributed.init_process_group("nccl" if gpu else "gloo", 60)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise EvalConfigError(f"world size {world} is not a multiple of TP*PP*CP={tp * pp * cp}")
    groups = distributed.init_model_parallel(tp, pp, cp)
    layout = ModelLayout(
        tp=tp,
        pp=pp,
        cp=cp,
        sequence_parallel=False,
        attention_backend="te" if gpu and te_available() else "local",
        engine="gpu" if gpu else "cpu",
        precision=mio.precision_of(mio.stored_dtype(ckpt)),
    )
    model = build_model(m, layout, groups, init_weights=False)
    checkpoint.load(ckpt, model, groups, restore_rng=False)
    model.requires_grad_(False)
    info = {"checkpoint": str(ckpt), "model": m.name, "tokenizer": tokenizer.name}
    return MegatronEvaluator(
        model,
        groups,
        tokenizer,
        micro_batch_size=cfg.micro_batch_size,
        chunk_size=cfg.logits_chunk_size,
        describe=info,
    )
