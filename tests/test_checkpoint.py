"""Checkpoint format, exact resume and resharding.

Distributed (gloo): at TP=2 and at PP=2, an uninterrupted 4-step run equals a run preempted
(SIGUSR1 on one rank) at step 2 and resumed by a fresh trainer -- losses, final weights and the
whole saved state (model + AdamW) bitwise. A world-1 job loads those TP=2 and PP=2 checkpoints:
gathered weights are identical and re-saving at TP=1/PP=1 writes bitwise the same tensors
(optimizer included). Weights-only checkpoints, shape mismatches, bad paths, the pickle policy
and pruning are checked as well.
"""

from __future__ import annotations

import pickle
import signal
from pathlib import Path

import pytest
import torch
from checkpoint_workers import common_write_fails_worker, reshard_worker, resume_worker
from dist_harness import run_distributed

from longpo_megatron import checkpoint
from longpo_megatron.checkpoint import paths, storage
from longpo_megatron.checkpoint.core import _alias
from longpo_megatron.preemption import PreemptionHandler

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"tp2": dict(tp=2, pp=1, signal_rank=1), "pp2": dict(tp=1, pp=2, signal_rank=0)}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("ckpt_data") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def resumed(small_data, tmp_path_factory) -> dict[str, list[dict]]:
    """Per layout: the per-rank results of :func:`resume_worker`."""
    out = {}
    for name, kw in LAYOUTS.items():
        tmp = tmp_path_factory.mktemp(f"resume_{name}")
        out[name] = run_distributed(
            resume_worker, 2, timeout_s=300, data=small_data, tmp=str(tmp), **kw
        )
    return out


def _equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ {set(a) ^ set(b)}"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _same_checkpoint(a: Path, b: Path) -> None:
    _equal_dicts(checkpoint.read_tensors(a), checkpoint.read_tensors(b), f"{a} vs {b}")
    ca, cb = checkpoint.read_common(a), checkpoint.read_common(b)
    assert ca["train_state"] == cb["train_state"]
    assert torch.equal(ca["reference_table"], cb["reference_table"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_exact_resume_bitwise(name, resumed):
    ranks = resumed[name]
    for r in ranks:  # every rank agreed to stop at step 2, although one rank got the signal
        assert r["p_preempted"] and r["p_step"] == 2 and r["b_start"] == 2
    logged = [r for r in ranks if r["a_losses"]][0]
    assert logged["p_losses"] == logged["a_losses"][:2]
    assert logged["b_losses"] == logged["a_losses"][2:]  # bitwise: float ==
    _equal_dicts(ranks[0]["b_final"], ranks[0]["a_final"], "final weights")
    root_a, root_p = (Path(p) for p in ranks[0]["roots"])
    _same_checkpoint(checkpoint.resolve(root_a), checkpoint.resolve(root_p))
    assert checkpoint.complete_steps(root_p) == [2, 4]


@pytest.mark.distributed
def test_rng_restored_per_rank(resumed):
    ranks = resumed["pp2"]  # stages are seeded differently, so the two ranks' states differ
    assert not torch.equal(ranks[0]["rng_at_save"], ranks[1]["rng_at_save"])
    for r in ranks:
        assert torch.equal(r["rng_after_load"], r["rng_at_save"])
        assert r["py_np_after_load"] == r["py_np_at_save"]
    assert ranks[0]["py_np_at_save"] != ranks[1]["py_np_at_save"]


@pytest.fixture(scope="module")
def resharded(resumed, small_data, tmp_path_factory) -> dict:
    sources = {name: resumed[name][0]["roots"][0] for name in LAYOUTS}
    tmp = tmp_path_factory.mktemp("reshard")
    res = run_distributed(
        reshard_worker, 1, timeout_s=300, data=small_data, tmp=str(tmp), sources=sources
    )[0]
    return {"res": res, "sources": sources}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_load_into_other_layout(name, resumed, resharded):
    """TP=2 -> TP=1 and PP=2 -> PP=1: same model, and a re-save writes the same tensors."""
    res, source = resharded["res"], Path(resharded["sources"][name])
    full, step, optim_state = res["loaded"][name]
    assert step == 4 and len(optim_state) > 0
    _equal_dicts(full, resumed[name][0]["a_final"], f"{name} -> TP1/PP1 weights")
    resaved = Path(res["resaved"][name])
    _equal_dicts(
        checkpoint.read_tensors(resaved),
        checkpoint.read_tensors(checkpoint.resolve(source)),
        f"{name} re-saved at TP1/PP1",
    )


@pytest.mark.distributed
def test_weights_only_checkpoint(resharded):
    w = resharded["res"]["weights"]
    assert w["step"] == 0 and w["optim_state"] == 0 and w["ref_scored"]
    assert w["common_note"] == "test"
    _equal_dicts(w["full"], resharded["res"]["loaded"]["pp2"][0], "weights checkpoint")


@pytest.mark.distributed
def test_shape_mismatch_names_path_and_key(resharded):
    msg = resharded["res"]["bad_shape_error"]
    assert msg is not None
    assert "iter_0000004" in msg and "linear_fc" in msg and "shape" in msg


# ---- single process ----------------------------------------------------------------------------


def _fake_iter(root: Path, step: int, complete: bool = True) -> Path:
    d = root / checkpoint.iter_dir_name(step)
    d.mkdir(parents=True)
    for name in paths.COMPLETE_FILES if complete else paths.COMPLETE_FILES[:1]:
        (d / name).write_bytes(b"x")
    return d


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope", None, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=r"empty: no 'latest' file"):
        checkpoint.load(tmp_path / "empty", None, None)
    (tmp_path / "root").mkdir()
    (tmp_path / "root/latest").write_text("iter_0000007\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"latest: names 'iter_0000007'"):
        checkpoint.resolve(tmp_path / "root")
    _fake_iter(tmp_path / "root", 7, complete=False)
    with pytest.raises(checkpoint.CheckpointError, match="iter_0000007.*incomplete"):
        checkpoint.resolve(tmp_path / "root")


def test_resolve_publish_and_prune(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    for step in (1, 2, 3):
        tmp = root / (checkpoint.iter_dir_name(step) + paths.TMP_SUFFIX)
        _fake_iter(tmp_path / "staging", step).rename(tmp)
        paths.publish(root, tmp, root / checkpoint.iter_dir_name(step))
        paths.prune(root, keep_last=2)
    assert (root / "latest").read_text() == "iter_0000003\n"
    assert checkpoint.complete_steps(root) == [2, 3]
    assert checkpoint.resolve(root) == root / "iter_0000003"
    assert checkpoint.resolve(root / "latest") == root / "iter_0000003"
    assert checkpoint.resolve(root / "iter_0000002") == root / "iter_0000002"
    (root / "iter_0000009.tmp").mkdir()  # a killed save and a killed prune
    (root / "iter_0000001.del").mkdir()
    paths.clear_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    (root / "latest").write_text("iter_0000002\n")  # never prune what latest names
    _fake_iter(root, 4)
    paths.prune(root, keep_last=1)
    assert checkpoint.complete_steps(root) == [2, 4]


def test_resave_of_latest_step_keeps_latest_valid(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    root.mkdir()
    for i, step in enumerate((2, 3, 3)):  # step 3 saved twice (a resumed run re-reaching it)
        tmp = root / (checkpoint.iter_dir_name(step) + paths.TMP_SUFFIX)
        _fake_iter(tmp_path / f"staging{i}", step).rename(tmp)
        paths.publish(root, tmp, root / checkpoint.iter_dir_name(step))
    assert checkpoint.resolve(root) == root / "iter_0000003"

    def die(path):  # killed while the old iter_0000003 is being replaced
        raise KeyboardInterrupt

    monkeypatch.setattr(paths, "remove_tree", die)
    tmp = root / ("iter_0000003" + paths.TMP_SUFFIX)
    _fake_iter(tmp_path / "staging_last", 3).rename(tmp)
    with pytest.raises(KeyboardInterrupt):
        paths.publish(root, tmp, root / "iter_0000003")
    assert checkpoint.resolve(root) == root / "iter_0000002"


def test_config_differences():
    saved = {"optim": {"lr": 1e-3, "min_lr": 0.0}, "model": {"hidden_size": 64}, "parallel": {}}
    now = {"optim": {"lr": 5e-4, "min_lr": 0.0}, "model": {"hidden_size": 64}, "parallel": {"x": 1}}
    assert checkpoint.config_differences(saved, now) == ["optim.lr: 0.001 -> 0.0005"]
    assert checkpoint.config_differences(None, {"train": {"seed": 1}}) == [
        "train: None -> {'seed': 1}"
    ]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_no_arbitrary_unpickling(tmp_path):
    ckpt = _fake_iter(tmp_path, 1)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to unpickle 'builtins.print'"):
        checkpoint.tensor_shapes(ckpt)
    torch.save({"format_version": 1, "x": _Evil()}, ckpt / "common.pt")
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.read_common(ckpt)


def test_te_and_local_norm_names_alias():
    stored = {"model.decoder.layers.self_attention.linear_qkv.layer_norm_weight": None}
    key = "optimizer.state.exp_avg.model.decoder.layers.input_layernorm.weight"
    assert _alias("model.decoder.layers.input_layernorm.weight", stored) == next(iter(stored))
    assert _alias(key, stored) == key  # only aliases what is stored
    assert _alias("model.output_layer.weight", stored) == "model.output_layer.weight"


def test_preemption_handler_records_signals():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        before = signal.getsignal(sig)
        handler = PreemptionHandler().install()
        assert not handler.requested()
        signal.raise_signal(sig)
        assert handler.received == sig and handler.signal_name == sig.name
        handler.uninstall()
        assert signal.getsignal(sig) == before


def test_read_tensors_reports_missing_keys(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata: missing"):
        storage.read_tensors(tmp_path, keys=["model.x"])


@pytest.mark.distributed
def test_rank0_common_write_failure_stops_every_rank(small_data, tmp_path):
    """megatron writes common.pt on rank 0 alone: a full disk there must stop every rank with
    one named error, not leave rank 1 waiting in the sharded save (the harness times out)."""
    out = run_distributed(
        common_write_fails_worker, 2, timeout_s=120, data=small_data, tmp=str(tmp_path)
    )
    for msg in out:
        assert "failed: rank 0: No space left on device" in msg, msg
        assert "common.pt" in msg, msg
    assert not (tmp_path / "ckpt" / "latest").exists()
