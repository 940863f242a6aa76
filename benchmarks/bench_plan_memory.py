"""``longpo-plan``'s memory estimate against the measured peak memory of CPU training steps.

Each case trains a small model (fp32, cpu engine, local attention) for two LongPO steps in fresh
processes (tests/dist_harness.py) at a given sequence length, layout and recompute mode. Measured
= the rank's peak RSS over the run minus its RSS just before the model is built (weights,
gradients, AdamW state, activations, loss, transient buffers). Estimated = the planner's total
for the same request (``engine=cpu``). glibc's mmap threshold is pinned at 128 KiB in the measured
processes (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS and RSS follows live
memory, as ``torch.cuda.max_memory_allocated`` does on a GPU; left dynamic, glibc keeps freed
blocks and the same run's peak varies by ±15%. Prints one table with the relative error:
    .venv/bin/python benchmarks/bench_plan_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench_context_parallel import _batch  # the same one-pair LongPO batch

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=352,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=264,
    max_position_embeddings=16384,
)
"""The measured model (a wider tiny Llama: activations dominate its memory)."""
CASES = [
    # (seq, tp, pp, cp, recompute)
    (2048, 1, 1, 1, "none"),
    (4096, 1, 1, 1, "none"),
    (4096, 1, 1, 1, "selective"),
    (8192, 1, 1, 1, "full"),
    (4096, 2, 1, 1, "none"),
    (4096, 1, 1, 2, "none"),
    (4096, 1, 2, 1, "none"),
]
MMAP_THRESHOLD = 128 * 1024
RESPONSE_TOKENS = 256
"""Response tokens of the measured pair (the rest of the sequence is prompt)."""
QUICK = [CASES[1], CASES[3], CASES[4], CASES[5]]


def _rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) here, so a transient peak before the
    measured region (imports, process-group start-up) is not taken for the step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> float:
    """Peak RSS (VmHWM) since :func:`_reset_peak`."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_rank(rank: int, world: int, seq: int, tp: int, pp: int, cp: int, recompute: str):
    """Peak bytes a rank adds over two training steps of the case (run under dist_harness)."""
    import torch
    import torch.distributed as dist

    from longpo_megatron.config import LongPOConfig, ModelConfig, OptimConfig
    from longpo_megatron.context_parallel import split_batch
    from longpo_megatron.distributed import init_model_parallel
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    dist.init_process_group("gloo")
    g = init_model_parallel(tp, pp, cp)
    step = make_train_forward_step(LongPOLossLayer(LongPOConfig(), LossGroups(g.tp, g.cp)))
    torch.manual_seed(1)
    batch = split_batch(_batch(seq, RESPONSE_TOKENS), g.cp_rank, cp)
    before = _rss_bytes()
    _reset_peak()
    torch.manual_seed(0)
    mcfg = ModelConfig(**MODEL, recompute=recompute)
    model = build_model(mcfg, ModelLayout(tp, pp, cp, False, "local", "cpu", "fp32"), g)
    engine = CpuEngine(model, g, OptimConfig(lr=1e-4))
    for _ in range(2):
        engine.train_step(step, [batch], 1e-4)
    return _peak_bytes() - before


def estimate_case(seq: int, tp: int, pp: int, cp: int, recompute: str) -> float:
    """The planner's per-rank total for the case (bytes)."""
    from longpo_megatron.config import ModelConfig
    from longpo_megatron.plan import Layout, PlanRequest, estimate

    req = PlanRequest(
        model=ModelConfig(**MODEL),
        seq_len=seq,
        gpus=tp * pp * cp,
        gpu_mem_gib=1024,
        micro_batch=1,
        global_batch=1,
        recompute=recompute,
        engine="cpu",
    )
    return estimate(req, Layout(tp, pp, cp, 1)).total


def run_case(seq: int, tp: int, pp: int, cp: int, recompute: str) -> dict:
    """Measured (max over ranks) and estimated bytes of one case."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dist_harness import run_distributed

    world = tp * pp * cp
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read at the children's start
    got = run_distributed(
        measure_rank, world, timeout_s=300, seq=seq, tp=tp, pp=pp, cp=cp, recompute=recompute
    )
    measured = max(got)
    est = estimate_case(seq, tp, pp, cp, recompute)
    return dict(
        seq=seq, tp=tp, pp=pp, cp=cp, recompute=recompute, measured=measured, estimated=est,
        error=(est - measured) / measured,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="four cases instead of all")
    args = ap.parse_args()
    print(f"{'seq':>6} {'TP':>3} {'PP':>3} {'CP':>3} {'recompute':>10} {'measured MiB':>13} "
          f"{'estimate MiB':>13} {'error':>7}")  # fmt: skip
    for case in QUICK if args.quick else CASES:
        r = run_case(*case)
        print(
            f"{r['seq']:>6} {r['tp']:>3} {r['pp']:>3} {r['cp']:>3} {r['recompute']:>10} "
            f"{r['measured'] / 2**20:>13.1f} {r['estimated'] / 2**20:>13.1f} {r['error']:>+7.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
