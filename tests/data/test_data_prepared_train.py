"""Training on prepared data == training on today's in-memory JSONL dataset: the same micro-
batches bit for bit and the same step-1 loss and gradients, on the bundled toy records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "data" / "toy" / "preference.jsonl"


def _config(out: Path, mode: str = "initial_policy", store: str | None = None):
    from parity_common import parity_config

    cfg = parity_config(1, 1, 1, str(TOY), str(out / "run"))
    cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size = 1, 4, 2
    cfg.data.cache_dir = str(out / "cache")
    cfg.reference.mode, cfg.reference.path = mode, store
    return cfg


def _one_step(cfg) -> dict[str, Any]:
    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.trainer import Trainer

    trainer = Trainer(cfg, validate_config(cfg, world_size=1, cuda_available=False)).setup()
    indices = list(range(len(trainer.dataset)))
    batches = trainer.micro_batches(indices[:4]) + trainer.micro_batches(indices[4:8])
    history = trainer.run()
    out = {
        "batches": batches,
        "loss": history[0]["loss"],
        "grad_norm": history[0]["grad_norm"],
        "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "ref": trainer.dataset.ref_state(),
        "store": str(getattr(trainer.dataset, "root", "")),
    }
    trainer.close()
    return out


def parity_worker(rank: int, world: int, *, tmp: str) -> dict[str, Any]:
    import longpo_megatron.trainer as trainer_module
    from longpo_megatron.data.dataset import load_dataset
    from longpo_megatron.reference.beside import store_beside
    from longpo_megatron.reference.store import reference_identity

    out = Path(tmp)
    prepared = _one_step(_config(out))
    cfg = _config(out)
    store = store_beside(type("D", (), {"root": prepared["store"]})(), reference_identity(cfg))

    def in_memory(data_cfg, tok):  # today's path: read + tokenize the JSONL in memory
        ds, report = load_dataset(data_cfg, tok)
        ds.report = lambda: report
        return ds

    trainer_module.prepared_for_run = in_memory
    jsonl = _one_step(_config(out, "precomputed", str(store)))
    return {"prepared": prepared, "jsonl": jsonl}


@pytest.mark.slow
def test_prepared_and_jsonl_give_identical_batches_and_step1(tmp_path) -> None:
    res = run_distributed(parity_worker, 1, timeout_s=600, tmp=str(tmp_path))[0]
    a, b = res["prepared"], res["jsonl"]
    assert torch.equal(a["ref"], b["ref"]) and not a["ref"].isnan().any()
    assert len(a["batches"]) == len(b["batches"]) == 4
    for x, y in zip(a["batches"], b["batches"]):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for name, w in a["weights"].items():
        assert torch.equal(w, b["weights"][name]), name
