"""``longpo-ref-logps``: score the reference once over a dataset and store the log-probs.

    torchrun --nproc-per-node 2 -m longpo_megatron.reference.cli parallel=tp2 \\
        reference.path=data/toy/ref_logps.jsonl [reference.load=CKPT | checkpoint.load=CKPT]

Distributed like training (TP/PP/DP; CP ranks share sequences), resumable (rows are appended
and fsynced per batch; a rerun skips records already scored), with a progress bar. Training then
uses ``reference=precomputed reference.path=...`` and loads no reference weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from longpo_megatron import distributed
from longpo_megatron.config import Config, register_configs, to_config
from longpo_megatron.config_validation import validate_config
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.preprocess import prepared_for_run
from longpo_megatron.data.tokenizer import build_tokenizer
from longpo_megatron.errors import report_user_errors
from longpo_megatron.model.gpt import build_model
from longpo_megatron.reference import ReferenceScorer, build_scorer
from longpo_megatron.reference.sequences import view_of
from longpo_megatron.reference.store import (
    ReferenceStoreError,
    append_rows,
    check_output,
    done_ids,
    header_for,
    merge_parts,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
os.environ.setdefault("LONGPO_ROOT", str(REPO_ROOT))


def _rows(items, sums: torch.Tensor, dataset: PreferenceDataset, view: str) -> list[dict]:
    per_pair: dict[int, dict[str, list[float]]] = {}
    for item, value in zip(items, sums.tolist()):
        side = "chosen" if item.side == 0 else "rejected"
        per_pair.setdefault(item.pair, {"chosen": [], "rejected": []})[side].append(value)
    return [
        {
            "id": dataset.record_id(p),
            "fingerprint": dataset.pair_fingerprint(p, view),
            "chosen": v["chosen"],
            "rejected": v["rejected"],
        }
        for p, v in per_pair.items()
    ]


def _todo(out: Path, dataset: PreferenceDataset) -> list[int]:
    """Pairs not yet stored (rank 0 reads the files; every rank gets the same answer)."""
    box = [sorted(done_ids(out)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    done = set(box[0])
    return [i for i in range(len(dataset)) if dataset.record_id(i) not in done]


def precompute(
    cfg: Config, scorer: ReferenceScorer, dataset: PreferenceDataset, out: Path, batch_pairs: int
) -> int:
    """Score every record not yet in ``out`` and write ``out``; returns records scored now."""
    view, part = view_of(cfg.longpo.loss), out.with_name(out.name + ".part000of001")
    todo, rank0 = _todo(out, dataset), dist.get_rank() == 0
    bar = tqdm(total=len(todo), desc="reference log-probs", unit="rec", disable=not rank0)
    for lo in range(0, len(todo), batch_pairs):
        chunk = todo[lo : lo + batch_pairs]
        items, sums, _ = scorer.score_items(dataset, chunk)
        if rank0:
            append_rows(part, _rows(items, sums, dataset, view))
        bar.update(len(chunk))
    bar.close()
    dist.barrier()
    if rank0:
        merge_parts(out, header_for(cfg), [dataset.record_id(i) for i in range(len(dataset))])
    dist.barrier()
    return len(todo)


def _initial_policy(cfg: Config, layout, groups) -> torch.nn.Module:
    """The initial policy's weights: ``checkpoint.load`` if set, else the seeded init."""
    model = build_model(cfg.model, layout, groups)
    if cfg.checkpoint.load:
        from longpo_megatron import checkpoint

        checkpoint.load(cfg.checkpoint.load, model, groups, restore_rng=False)
    return model


@hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name="config")
@report_user_errors
def _hydra_main(dcfg: DictConfig) -> None:
    from longpo_megatron.trainer import model_layout

    cfg = to_config(dcfg)
    if not cfg.reference.path:
        raise ReferenceStoreError("longpo-ref-logps: set reference.path=<output .jsonl>")
    check_output(Path(cfg.reference.path), cfg.data.path)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_config(cfg, world_size=world, cuda_available=torch.cuda.is_available())
    backend = cfg.parallel.distributed_backend or ("nccl" if layout.engine == "gpu" else "gloo")
    distributed.init_process_group(backend, cfg.parallel.timeout_minutes)
    try:
        groups = distributed.init_model_parallel(layout.tp, layout.pp, layout.cp)
        distributed.seed_all(cfg.train.seed, groups, cuda=layout.engine == "gpu")
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        dataset = prepared_for_run(cfg.data, tokenizer)
        mlayout = model_layout(layout, cfg.parallel.cp_comm_type)
        policy = None if cfg.reference.load else _initial_policy(cfg, mlayout, groups)
        scorer = build_scorer(cfg, mlayout, groups, tokenizer.pad_id, policy)
        n = precompute(cfg, scorer, dataset, Path(cfg.reference.path), 4 * layout.dp)
        if dist.get_rank() == 0:
            print(
                f"reference log-probs: {n} records scored now, {len(dataset)} in "
                f"{cfg.reference.path}",
                flush=True,
            )
    finally:
        distributed.destroy()


def main() -> None:
    """Console entry point."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
