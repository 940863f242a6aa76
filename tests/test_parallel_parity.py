"""DP / TP / PP / CP parity: the distributed trainer equals the independent single-process
reference.

Each layout trains the same 3 steps; rank 0 gathers full weights and gradients. The test process
replays the steps with ``reference_impl`` (plain PyTorch, no package code in the math) from the
gathered initial weights and compares reference scores, loss, every metric, grad-norm, step-1
gradients and final weights at fp32, relative error ≤ 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_harness import run_distributed
from parity_common import assert_matches_reference, parity_worker

LAYOUTS = {  # name: (dp, tp, pp, cp)
    "dp2": (2, 1, 1, 1),
    "tp2": (1, 2, 1, 1),
    "pp2": (1, 1, 2, 1),
    "tp2_pp2": (1, 2, 2, 1),
    "dp2_tp2": (2, 2, 1, 1),
    "cp2": (1, 1, 1, 2),
    "cp4": (1, 1, 1, 4),
    "tp2_cp2": (1, 2, 1, 2),
    "cp2_pp2": (1, 1, 2, 2),
    "dp2_cp2": (2, 1, 1, 2),
}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """The first 8 toy records (keeps each step a few seconds on 2 cores)."""
    src = Path(__file__).resolve().parent.parent / "data/toy/preference.jsonl"
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()][:8]
    path = tmp_path_factory.mktemp("parity") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _dataset(path: str):
    from longpo_megatron.config import DataConfig
    from longpo_megatron.data.dataset import load_dataset
    from longpo_megatron.data.tokenizer import build_tokenizer

    return load_dataset(DataConfig(path=path), build_tokenizer("byte"))[0]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parity_with_reference(name, small_data, tmp_path):
    dp, tp, pp, cp = LAYOUTS[name]
    results = run_distributed(
        parity_worker,
        dp * tp * pp * cp,
        timeout_s=420,
        tp=tp,
        pp=pp,
        cp=cp,
        data_path=small_data,
        out_dir=str(tmp_path),
    )
    logged = assert_matches_reference(results, _dataset(small_data), name)
    report = {k: logged["history"][-1][k] for k in ("loss", "grad_norm")}
    print(f"{name}: {json.dumps(report)}")
