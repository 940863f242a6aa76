"""``longpo-plan``: layouts, refusals, the CLI, and memory estimates against measured CPU runs.

The measured side trains a small model for two LongPO steps in fresh processes and takes the
rank's peak RSS growth (benchmarks/bench_plan_memory.py, glibc's mmap threshold pinned so RSS
follows live memory); the planner must be within 15% of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from longpo_megatron.plan import Layout, PlanError, PlanRequest, layouts, load_model, plan

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_plan_memory import run_case  # noqa: E402

TOLERANCE = 0.15


def _request(model: str, seq: int, gpus: int, **kw) -> PlanRequest:
    return PlanRequest(model=load_model(model), seq_len=seq, gpus=gpus, gpu_mem_gib=80, **kw)


def _check(case: tuple) -> None:
    r = run_case(*case)
    assert abs(r["error"]) <= TOLERANCE, (
        f"{case}: estimate {r['estimated'] / 2**20:.1f} MiB vs measured "
        f"{r['measured'] / 2**20:.1f} MiB ({r['error']:+.1%})"
    )


@pytest.mark.distributed
def test_estimate_matches_measured_single_rank():
    _check((4096, 1, 1, 1, "none"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "case",
    [
        (2048, 1, 1, 1, "none"),
        (4096, 1, 1, 1, "selective"),
        (8192, 1, 1, 1, "full"),
        (4096, 2, 1, 1, "none"),
        (4096, 1, 1, 2, "none"),
        (4096, 1, 2, 1, "none"),
    ],
    ids=str,
)
def test_estimate_matches_measured(case):
    _check(case)


def test_layouts_respect_head_and_kv_divisibility():
    req = _request("qwen2_5_7b", 131072, 8)
    found, why = layouts(req)
    assert {lay.tp for lay in found} == {1, 2, 4}
    assert any("TP=8" in w and "num_query_groups=4" in w for w in why)
    assert all(lay.tp * lay.pp * lay.cp * lay.dp == 8 for lay in found)
    assert all(131072 % (2 * lay.cp * lay.tp) == 0 for lay in found)


def test_recommendation_fits_and_prefers_data_parallelism():
    rows, best = plan(_request("mistral_7b", 131072, 8))
    assert best.fits and best.memory.total <= 0.9 * 80 * 2**30
    assert best.layout == Layout(2, 1, 2, 2)
    assert all(r.layout.dp <= best.layout.dp for r in rows if r.fits)
    online = plan(_request("mistral_7b", 131072, 8, reference="online"))[1]
    assert online.memory.reference == online.memory.weights > 0


def test_more_memory_for_longer_sequences_less_with_recompute():
    lay = Layout(2, 1, 4, 1)
    from longpo_megatron.plan import estimate

    short = estimate(_request("mistral_7b", 131072, 8), lay)
    long = estimate(_request("mistral_7b", 262144, 8), lay)
    none = estimate(_request("mistral_7b", 131072, 8, recompute="none"), lay)
    assert long.activations > 1.9 * short.activations
    assert none.activations > 5 * short.activations
    assert long.weights == short.weights


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model="mistral_7b", seq=524288, gpus=8), "does not fit 8 GPUs of 80 GiB"),
        (dict(model="mistral_7b", seq=131072, gpus=7), "no valid layout.*TP=7"),
        (dict(model="mistral_7b", seq=131072, gpus=8, mfu=1.5), "0 < mfu <= 1"),
    ],
)
def test_impossible_requests_are_refused_with_the_reason(kw, match):
    extra = {k: v for k, v in kw.items() if k not in ("model", "seq", "gpus")}
    with pytest.raises(PlanError, match=match):
        plan(_request(kw["model"], kw["seq"], kw["gpus"], **extra))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longpo_megatron.plan", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_cli_prints_table_flops_and_recommendation():
    out = _cli("--model", "mistral_7b", "--seq-len", "524288", "--gpus", "16")
    assert out.returncode == 0, out.stderr
    assert "TP2 PP1 CP8 DP1" in out.stdout and "<- recommended" in out.stdout
    assert "parallel.context_parallel_size=8" in out.stdout and "FLOPs per step" in out.stdout
    bad = _cli("--model", "nope", "--seq-len", "1024", "--gpus", "1")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "mistral_7b" in bad.stderr and "Traceback" not in bad.stderr
