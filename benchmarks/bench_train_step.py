"""Tokens/s and peak memory of one LongPO training step of the tiny model on CPU.

Each configuration runs in a fresh process (peak RSS is per process), one rank, fp32:
    .venv/bin/python benchmarks/bench_train_step.py [--seq 512 1024 2048] [--steps 3]
Prints one table; ratios are against the first row of the same sequence length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _one(seq: int, recompute: str, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from longpo_megatron.config import LongPOConfig, ModelConfig, OptimConfig
    from longpo_megatron.distributed import init_model_parallel
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29600 + seq % 97))
    dist.init_process_group("gloo", rank=0, world_size=1)
    groups = init_model_parallel(1, 1, 1)
    torch.manual_seed(0)
    mcfg = ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=352, recompute=recompute)
    model = build_model(mcfg, ModelLayout(1, 1, 1, False, "local", "cpu", "fp32"), groups)
    engine = CpuEngine(model, groups, OptimConfig(lr=1e-4))
    step = make_train_forward_step(
        LongPOLossLayer(LongPOConfig(), LossGroups(groups.tp, groups.cp))
    )
    tokens = torch.randint(0, 256, (2, seq))
    resp = torch.zeros(2, seq)
    resp[:, -seq // 8 :] = 1.0
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(2, seq),
        "labels": torch.roll(tokens, -1, 1),
        "response_mask": resp,
        "real_mask": torch.ones(2, seq),
        "ref_logps": torch.tensor([-100.0, -110.0]),
    }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine.train_step(step, [batch], 1e-4)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_step(step, [batch], 1e-4)
    dt = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seq": seq,
        "recompute": recompute,
        "tokens_per_s": 2 * seq / dt,
        "step_ms": dt * 1e3,
        "peak_rss_mb": peak / 1024,
        "step_growth_mb": (peak - base) / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--recompute", nargs="+", default=["none", "selective", "full"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_one(int(args.child[0]), args.child[1], args.steps)))
        return
    rows = []
    for seq in args.seq:
        for rc in args.recompute:
            cmd = [sys.executable, __file__, "--child", str(seq), rc, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    hdr = f"{'seq':>6} {'recompute':>10} {'tok/s':>9} {'step ms':>9} {'peak RSS MB':>12} "
    hdr += f"{'step growth MB':>15} {'tok/s ratio':>12}"
    print(hdr)
    first: dict[int, dict] = {}
    for r in rows:
        base = first.setdefault(r["seq"], r)
        print(
            f"{r['seq']:>6} {r['recompute']:>10} {r['tokens_per_s']:>9.0f} {r['step_ms']:>9.1f} "
            f"{r['peak_rss_mb']:>12.1f} {r['step_growth_mb']:>15.1f} "
            f"{r['tokens_per_s'] / base['tokens_per_s']:>12.2f}"
        )


if __name__ == "__main__":
    main()
