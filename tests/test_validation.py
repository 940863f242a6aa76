"""Held-out validation against the independent plain-PyTorch implementation.

Distributed (gloo, DP=2 and TP=2): 2 of 8 pairs held out, validated after each step. The logged
``valid/*`` means equal the reference implementation's LongPO terms on those pairs, computed
from the gathered weights after the step (policy) and the initial weights (reference). The
held-out pairs never train (the training set shrinks), and a resumed run restores their
reference scores from the checkpoint instead of re-scoring them with a trained policy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from parity_common import HYPER, ref_config
from reference_impl import from_megatron_state_dict, longpo_reference_loss, ref_short_logps
from validation_workers import validation_worker

from longpo_megatron.config import Config
from longpo_megatron.config_validation import ConfigError, validate_config
from longpo_megatron.data.collate import collate_pairs, collate_short
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.validation import split_validation

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("loss", "nll", "pref_loss", "rewards/margins", "rewards/accuracy", "rewards/chosen")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("valid") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _expected(init: dict, final: dict, pairs) -> tuple[torch.Tensor, dict[str, float]]:
    """Reference scores (initial weights) and the LongPO metrics (final weights) of ``pairs``."""
    cfg = ref_config()
    reference, policy = from_megatron_state_dict(init, cfg), from_megatron_state_dict(final, cfg)
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, pair in enumerate(pairs):
        for side, seqs in enumerate((pair.ref_chosen, pair.ref_rejected)):
            table[i, side] = ref_short_logps(reference, collate_short(seqs, 256)).double().sum()
    batches = [collate_pairs([p], 256, 1, [tuple(table[i].tolist())]) for i, p in enumerate(pairs)]
    with torch.no_grad():
        _, metrics = longpo_reference_loss(
            policy, batches, HYPER["beta"], HYPER["lam"], HYPER["nll_scope"]
        )
    return table, metrics


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["dp2", "tp2"])
def test_validation_matches_reference(tp, small_data, tmp_path):
    results = run_distributed(
        validation_worker, 2, timeout_s=300, tp=tp, data=small_data, tmp=str(tmp_path)
    )
    r0 = results[0]
    logged = [r for r in results if r["logging_rank"]][0]
    assert r0["train_size"] == 6 and len(r0["valid_pairs"]) == 2
    table, metrics = _expected(r0["init"], r0["final"], r0["valid_pairs"])
    assert torch.allclose(r0["table"], table, rtol=1e-5, atol=1e-4)
    last = logged["history"][-1]
    assert last["valid/pairs"] == 2.0
    for key in KEYS:
        assert last[f"valid/{key}"] == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key
    assert all("valid/loss" in h for h in logged["history"])  # valid_interval=1
    assert torch.equal(r0["resumed_table"], r0["table"])  # restored, not re-scored


def test_split_is_seeded_and_disjoint():
    from longpo_megatron.data.tokenize import TokenizedPair

    pairs = [TokenizedPair(i, [i, 1], [i, 2], [False, True], [False, True]) for i in range(10)]
    train, valid = split_validation(PreferenceDataset(pairs), 0.25, seed=3)
    again = split_validation(PreferenceDataset(pairs), 0.25, seed=3)[1]
    assert len(valid) == 3 and len(train) == 7
    def items(ds):  # the split is a lazy view: read it pair by pair
        return [ds[i] for i in range(len(ds))]

    assert [p.chosen for p in items(valid)] == [p.chosen for p in items(again)]
    firsts = {p.chosen[0] for p in items(train)} | {p.chosen[0] for p in items(valid)}
    assert firsts == set(range(10)) and [p.index for p in items(valid)] == [0, 1, 2]
    with pytest.raises(ValueError, match="validation_fraction"):
        split_validation(PreferenceDataset(pairs[:1]), 0.5, seed=0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"validation_path": "v.jsonl", "validation_fraction": 0.1}, "not both"),
        ({"validation_fraction": 0.1, "mode": "precomputed"}, "precomputed"),
        ({"valid_interval": 5}, "no validation set"),
    ],
)
def test_validation_config_errors(overrides, match):
    cfg = Config()
    for key, value in overrides.items():
        if key == "mode":
            cfg.reference.mode, cfg.reference.path = value, "scores.jsonl"
        elif key == "valid_interval":
            cfg.train.valid_interval = value
        else:
            setattr(cfg.data, key, value)
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg, world_size=1, cuda_available=False)
