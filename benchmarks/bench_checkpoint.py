"""How long a checkpoint save blocks training: synchronous vs asynchronous, CPU, one rank.

A ~50M-parameter model (10 layers, hidden 640, SwiGLU 1728, vocab 4096) with AdamW state (one
real step), so each checkpoint holds ~3 x 50M fp32 values. Each mode saves ``--saves`` times
(keep_last=1) into a fresh directory; "blocking" is the time ``checkpoint.save`` keeps the
training loop (for async: copying the state and scheduling the writer thread), "total" the
time until the checkpoint is published (``latest`` moved). Both modes run in the same process,
side by side:
    .venv/bin/python benchmarks/bench_checkpoint.py [--saves 3] [--dir /tmp/bench_ckpt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _setup(args):
    from longpo_megatron.config import ModelConfig, OptimConfig
    from longpo_megatron.distributed import init_model_parallel
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29731"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    groups = init_model_parallel(1, 1, 1)
    torch.manual_seed(0)
    mcfg = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=10, num_query_groups=5, vocab_size=args.vocab,
    )  # fmt: skip
    model = build_model(mcfg, ModelLayout(1, 1, 1, False, "local", "cpu", "fp32"), groups)
    engine = CpuEngine(model, groups, OptimConfig(lr=1e-4))
    for p in engine.params:  # one optimizer step so AdamW has its state
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    return model, engine, groups


def _bench(mode: str, root: Path, model, engine, groups, saves: int) -> dict[str, float]:
    from longpo_megatron import checkpoint

    shutil.rmtree(root, ignore_errors=True)
    writer = checkpoint.AsyncCheckpointWriter(gpu=False) if mode == "async" else None
    blocking, total = [], []
    for step in range(1, saves + 1):
        t0 = time.perf_counter()
        checkpoint.save(
            root, step, model, groups, optimizer=engine.optimizer, keep_last=1,
            train_state={"step": step, "consumed_pairs": 0, "sampler": {}}, async_writer=writer,
        )  # fmt: skip
        blocking.append(time.perf_counter() - t0)
        if writer is not None:
            writer.wait()
        total.append(time.perf_counter() - t0)
        assert checkpoint.resolve(root).name == checkpoint.iter_dir_name(step)
    size = sum(f.stat().st_size for f in checkpoint.resolve(root).rglob("*") if f.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return {
        "blocking": statistics.median(blocking),
        "total": statistics.median(total),
        "size_mb": size / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--saves", type=int, default=3)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--ffn", type=int, default=1728)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dir", default="/tmp/longpo_bench_ckpt")
    args = ap.parse_args()
    model, engine, groups = _setup(args)
    params = sum(p.numel() for p in engine.params)
    rows = {
        m: _bench(m, Path(args.dir) / m, model, engine, groups, args.saves)
        for m in ("sync", "async")
    }
    base = rows["sync"]["blocking"]
    print(f"model: {params / 1e6:.1f}M parameters (+ AdamW state); median of {args.saves} saves")
    print("| mode | checkpoint MiB | blocks training (s) | until published (s) | vs sync |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['size_mb']:.0f} | {r['blocking']:.3f} | {r['total']:.3f} | "
            f"{r['blocking'] / base:.3f}x |"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
