"""Dataset loading, reference scores, and the bundled toy file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longpo_megatron.config import DataConfig
from longpo_megatron.data import (
    ByteChatTokenizer,
    PairSampler,
    collate_pairs,
    load_dataset,
    read_records,
)

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "data" / "toy" / "preference.jsonl"


def test_toy_file_loads_with_zero_errors() -> None:
    records, report = read_records(TOY)
    assert len(records) == 24 and report.total_skipped == 0
    assert TOY.read_bytes().isascii()
    for rec in records:
        assert 500 <= len(rec.document) <= 900 and len(rec.turns) == 2
        assert rec.document == "\n\n".join(t.short_context for t in rec.turns)
    ds, report = load_dataset(DataConfig(path=str(TOY)), ByteChatTokenizer())
    assert len(ds) == 24 and report.total_skipped == 0 and report.records_ok == 24
    for pair in ds.pairs:
        assert max(len(pair.chosen), len(pair.rejected)) <= 1024
        assert max(len(s[0]) for s in pair.ref_chosen + pair.ref_rejected) <= 512


def test_toy_generator_is_up_to_date() -> None:
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "tools" / "make_toy_data.py"), "--check"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_reference_scores_and_collate() -> None:
    ds, _ = load_dataset(DataConfig(path=str(TOY)), ByteChatTokenizer())
    assert not ds.has_ref_logps and ds.unscored_indices() == list(range(24))
    with pytest.raises(KeyError):
        ds.ref_logps(0)
    for i in range(len(ds)):
        ds.set_ref_logps(i, -float(i), -float(i) - 0.5)
    assert ds.has_ref_logps
    table = ds.ref_state()
    ds.load_ref_state(table)
    assert torch.equal(ds.ref_state(), table)
    idx = PairSampler(len(ds), seed=0).next_global_batch(3)
    batch = collate_pairs([ds[i] for i in idx], 256, 8, ref_logps=ds.ref_logps_for(idx))
    assert batch["pair_index"].tolist() == idx
    assert batch["ref_logps"].tolist() == [-i for i in idx] + [-i - 0.5 for i in idx]
    assert batch["tokens"].shape[1] % 8 == 0
    with pytest.raises(ValueError, match="non-finite"):
        ds.set_ref_logps(0, float("nan"), 0.0)


def test_load_dataset_over_length_policy(tmp_path: Path) -> None:
    lines = TOY.read_text().splitlines()[:3]
    big = json.loads(lines[1])
    big["document"] = "x" * 2000
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(big), lines[2]]) + "\n")
    cfg = DataConfig(path=str(path), over_length_policy="skip")
    ds, report = load_dataset(cfg, ByteChatTokenizer())
    assert len(ds) == 2 and dict(report.skipped) == {"over_length": 1}
    assert [r.id for r in ds.records or []] == ["toy-0001", "toy-0003"]
    with pytest.raises(Exception, match="toy-0002"):
        load_dataset(DataConfig(path=str(path)), ByteChatTokenizer())
    with pytest.raises(ValueError, match="no usable records"):
        load_dataset(
            DataConfig(path=str(path), max_seq_length=10, over_length_policy="skip"),
            ByteChatTokenizer(),
        )
