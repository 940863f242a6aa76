"""The frozen reference: online, initial-policy and precomputed scores agree (TP=1, TP=2, PP=2),
and stored scores that no longer match the data or the run are refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from gather import gather_full_state
from parity_common import parity_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:6]
    path = tmp_path_factory.mktemp("ref") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cfg(data: str, out: str, tp: int = 1, pp: int = 1, mode: str = "initial_policy"):
    cfg = parity_config(tp, pp, 1, data, out)
    cfg.reference.mode = mode
    cfg.train.global_batch_size = 2
    return cfg


def _grads(trainer, indices):
    """Loss and gathered gradients of one forward-backward on ``indices`` (no update)."""
    for p in trainer.model.parameters():
        p.grad = None
    metrics = trainer.engine.schedule(
        forward_step_func=trainer.forward_step,
        data_iterator=iter(trainer.micro_batches(indices)),
        model=trainer.model,
        num_microbatches=len(indices) // trainer.groups.dp_size,
    )
    g = trainer.groups
    grads = gather_full_state(trainer.model, g, grads=True, num_layers=4)
    loss = sum(float(m["loss"].sum()) for m in metrics) if metrics else None
    return loss, grads


def _crash_and_resume(cfg, scorer, ds, store: Path, precompute) -> tuple[int, bool]:
    """Leave what a killed run leaves (2 rows + a torn line), rerun, compare with the full run."""
    import torch.distributed as dist

    full = store.read_text()
    dist.barrier()
    if dist.get_rank() == 0:
        store.unlink()
        rows = full.splitlines()[1:3]
        part = store.with_name(store.name + ".part000of001")
        part.write_text("\n".join(rows) + '\n{"id": "torn')
    dist.barrier()
    scored = precompute(cfg, scorer, copy.deepcopy(ds), store, batch_pairs=4)
    return scored, store.read_text() == full


def modes_worker(rank: int, world: int, *, tp: int, pp: int, data: str, out: str) -> dict:
    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.reference import build_scorer, load_store
    from longpo_megatron.reference.cli import precompute
    from longpo_megatron.trainer import Trainer

    cfg = _cfg(data, out, tp, pp)
    trainer = Trainer(cfg, validate_config(cfg, world, False)).setup()
    ds, g = trainer.dataset, trainer.groups
    initial = ds.ref_state()
    online_cfg = copy.deepcopy(cfg)
    online_cfg.reference.mode = "online"
    scorer = build_scorer(online_cfg, trainer.mlayout, g, 256, trainer.model)
    online = copy.deepcopy(ds)
    online.load_ref_state(torch.full_like(initial, float("nan")))
    scorer.fill(online, [0, 3])
    store = Path(out) / "ref_logps.jsonl"
    precompute(cfg, scorer, copy.deepcopy(ds), store, batch_pairs=4)
    res_resume = _crash_and_resume(cfg, scorer, ds, store, precompute)
    stored = copy.deepcopy(ds)
    load_store(store, cfg, stored)
    res = {"initial": initial, "online": online.ref_state(), "stored": stored.ref_state()}
    res["resume"] = res_resume
    res["loss_initial"], res["grads_initial"] = _grads(trainer, [0, 3])
    ds.load_ref_state(stored.ref_state())
    res["loss_stored"], res["grads_stored"] = _grads(trainer, [0, 3])
    ref_params = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
    res["ref_frozen"] = all(
        not p.requires_grad and p.grad is None for p in scorer.model.parameters()
    )
    res["ref_param_mb"] = ref_params / 2**20
    trainer.close()
    return res


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_online_initial_and_precomputed_agree(tp, pp, small_data, tmp_path):
    results = run_distributed(
        modes_worker, tp * pp, timeout_s=300, tp=tp, pp=pp, data=small_data, out=str(tmp_path)
    )
    r = results[0]
    last = [x for x in results if x["loss_initial"] is not None][0]
    torch.testing.assert_close(r["online"][[0, 3]], r["initial"][[0, 3]], rtol=1e-6, atol=0)
    assert torch.isnan(r["online"][[1, 2, 4, 5]]).all()  # online scores only the step's pairs
    torch.testing.assert_close(r["stored"], r["initial"], rtol=1e-6, atol=0)
    assert last["loss_stored"] == pytest.approx(last["loss_initial"], rel=1e-6)
    for name, want in r["grads_initial"].items():
        got = r["grads_stored"][name]
        # float32 noise: both tables come from chunked scoring, in different micro-batch mixes
        assert (got - want).norm() <= 1e-5 * want.norm() + 1e-12, name
    assert r["ref_frozen"]
    assert r["resume"] == (len(r["initial"]) - 2, True)  # rerun scored only the missing records
    print(f"tp={tp} pp={pp}: reference params {r['ref_param_mb']:.3f} MB/rank, no grads/optim")


# ---- stored scores: staleness and resume (single process, no model) -------------------------


@pytest.fixture()
def toy_store(tmp_path, small_data):
    """A dataset, a config and a valid store with made-up (but well-formed) scores."""
    from longpo_megatron.config import DataConfig
    from longpo_megatron.data.dataset import load_dataset
    from longpo_megatron.data.tokenizer import build_tokenizer
    from longpo_megatron.reference.sequences import fingerprint
    from longpo_megatron.reference.store import append_rows, header_for, merge_parts

    cfg = _cfg(small_data, str(tmp_path), mode="precomputed")
    ds, _ = load_dataset(DataConfig(path=small_data), build_tokenizer("byte"))
    out = tmp_path / "ref.jsonl"
    rows = [
        {"id": ds[i].record_id, "fingerprint": fingerprint(ds[i], "short"),
         "chosen": [-1.0 - i, -2.0], "rejected": [-3.0, -4.0 - i]}
        for i in range(len(ds))
    ]  # fmt: skip
    append_rows(out.with_name(out.name + ".part000of001"), rows)
    merge_parts(out, header_for(cfg), [ds[i].record_id for i in range(len(ds))])
    return cfg, ds, out


def test_store_round_trip(toy_store):
    from longpo_megatron.reference import load_store

    cfg, ds, out = toy_store
    load_store(out, cfg, ds)
    assert ds.ref_logps(2) == (-5.0, -9.0)


def test_store_refuses_another_reference(toy_store):
    from longpo_megatron.reference import ReferenceStoreError, load_store

    cfg, ds, out = toy_store
    cfg.model.reference_rotary_base = 1e6
    with pytest.raises(ReferenceStoreError, match="another reference.*reference_rotary_base"):
        load_store(out, cfg, ds)
    cfg.model.reference_rotary_base = None
    cfg.reference.load = "/ckpt/other-model"
    with pytest.raises(ReferenceStoreError, match="weights: stored"):
        load_store(out, cfg, ds)


def test_store_refuses_edited_record_and_missing_record(toy_store):
    from longpo_megatron.reference import ReferenceStoreError, load_store

    cfg, ds, out = toy_store
    lines = out.read_text().splitlines()
    row = json.loads(lines[3])
    row["fingerprint"] = "0" * 64  # what an edit of the record's text looks like
    lines[3] = json.dumps(row)
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReferenceStoreError, match=f"line 4, record '{row['id']}'.*other tokens"):
        load_store(out, cfg, ds)
    out.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ReferenceStoreError, match="no reference log-probs for record"):
        load_store(out, cfg, ds)


def test_store_refuses_other_view(toy_store):
    from longpo_megatron.reference import ReferenceStoreError, load_store

    cfg, ds, out = toy_store
    cfg.longpo.loss = "dpo"  # plain DPO scores the LONG prompt
    with pytest.raises(ReferenceStoreError, match="view: stored 'short' vs run 'long'"):
        load_store(out, cfg, ds)


def test_partial_line_of_a_killed_writer_is_redone(tmp_path):
    from longpo_megatron.reference.store import append_rows, done_ids

    out = tmp_path / "r.jsonl"
    part = out.with_name(out.name + ".part000of001")
    append_rows(part, [{"id": "a", "fingerprint": "f", "chosen": [1.0], "rejected": [2.0]}])
    with open(part, "a") as f:
        f.write('{"id": "b", "fingerpr')  # killed mid-write
    assert done_ids(out) == {"a"}


def test_dpo_reference_scores_the_long_sequences(toy_store):
    """loss=dpo: the reference sees the policy's LONG prompt; longpo: each turn's SHORT one."""
    from longpo_megatron.reference import reference_items, view_of

    _, ds, _ = toy_store
    pair = ds[1]
    long_items = reference_items(ds, [1], view_of("dpo"))
    assert [(it.side, it.turn) for it in long_items] == [(0, -1), (1, -1)]
    assert long_items[0].seq[0] == pair.chosen and long_items[1].seq[0] == pair.rejected
    short = reference_items(ds, [1], view_of("longpo"))
    assert [it.seq for it in short] == list(pair.ref_chosen) + list(pair.ref_rejected)
    assert all(len(it.seq[0]) < len(pair.chosen) for it in short)
