"""Context parallelism on CPU: per-rank peak memory and step time vs sequence length, CP = 1/2/4.

One LongPO training step (one chosen/rejected pair, tiny model, fp32, gloo) per configuration,
each in fresh processes. "act MB" is the rank's peak RSS over two steps minus its RSS just before
them (activations, gradients, optimizer state, transient buffers — weights excluded). A second
table shows the loss layer alone: its peak memory does not grow with the prompt (logits only
where labels count, computed in chunks).

    .venv/bin/python benchmarks/bench_context_parallel.py [--seq 2048 4096 8192 16384] [--cp 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time


def _rss_mb() -> float:
    """Peak resident set size of this process so far (high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """Resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batch(seq: int, resp: int):
    import torch

    tokens = torch.randint(0, 256, (2, seq))
    mask = torch.zeros(2, seq)
    mask[:, seq - resp - 1 : seq - 1] = 1.0
    return {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(2, seq).contiguous(),
        "labels": torch.roll(tokens, -1, 1),
        "response_mask": mask,
        "real_mask": torch.ones(2, seq),
        "ref_logps": torch.tensor([-100.0, -110.0]),
    }


def _train_rank(seq: int, cp: int) -> dict:
    import torch
    import torch.distributed as dist

    from longpo_megatron.config import LongPOConfig, ModelConfig, OptimConfig
    from longpo_megatron.context_parallel import split_batch
    from longpo_megatron.distributed import init_model_parallel
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    g = init_model_parallel(1, 1, cp)
    torch.manual_seed(0)
    mcfg = ModelConfig(
        num_layers=4, hidden_size=128, ffn_hidden_size=352, max_position_embeddings=max(seq, 4096)
    )
    model = build_model(mcfg, ModelLayout(1, 1, cp, False, "local", "cpu", "fp32"), g)
    engine = CpuEngine(model, g, OptimConfig(lr=1e-4))
    step = make_train_forward_step(
        LongPOLossLayer(LongPOConfig(nll_scope="responses"), LossGroups(g.tp, g.cp))
    )
    torch.manual_seed(1)
    batch = split_batch(_batch(seq, 256), g.cp_rank, cp)
    before = _current_rss_mb()
    engine.train_step(step, [batch], 1e-4)  # warm-up (optimizer state is made here)
    t0 = time.perf_counter()
    engine.train_step(step, [batch], 1e-4)
    dt = time.perf_counter() - t0
    out = {
        "seq": seq,
        "cp": cp,
        "rank": dist.get_rank(),
        "act_mb": _rss_mb() - before,
        "peak_mb": _rss_mb(),
        "step_s": dt,
    }
    dist.destroy_process_group()
    return out


def _loss_layer(prompt: int, scope: str) -> dict:
    import torch
    import torch.distributed as dist

    from longpo_megatron.config import LongPOConfig
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups

    dist.init_process_group("gloo", rank=0, world_size=1)
    g = dist.group.WORLD
    vocab, hidden, resp = 32000, 256, 256
    seq = prompt + resp
    batch = _batch(seq, resp)
    batch["labels"] = torch.randint(0, vocab, (2, seq))
    h = torch.randn(seq, 2, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True) * 0.02
    layer = LongPOLossLayer(LongPOConfig(nll_scope=scope, logits_chunk_size=512), LossGroups(g, g))
    before = _current_rss_mb()
    loss, _ = layer(h, batch, w)
    loss.backward()
    return {
        "prompt": prompt,
        "scope": scope,
        "loss_layer_mb": _rss_mb() - before,
        "full_logits_mb": 2 * seq * vocab * 4 / 2**20,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], world: int) -> list[dict]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"child failed: {args}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, x, y = a.child
        res = _train_rank(int(x), int(y)) if kind == "train" else _loss_layer(int(x), y)
        print(json.dumps(res))
        return
    print(
        f"{'seq':>6} {'CP':>3} {'act MB/rank':>12} {'vs CP=1':>8} {'peak RSS MB':>12} {'step s':>8}"
    )
    base: dict[int, float] = {}
    for seq in a.seq:
        for cp in a.cp:
            ranks = _launch(["train", str(seq), str(cp)], cp)
            act = max(r["act_mb"] for r in ranks)
            base.setdefault(seq, act)
            print(
                f"{seq:>6} {cp:>3} {act:>12.1f} {act / base[seq]:>8.2f} "
                f"{max(r['peak_mb'] for r in ranks):>12.1f} "
                f"{max(r['step_s'] for r in ranks):>8.2f}",
                flush=True,
            )
    print(f"\n{'prompt':>7} {'nll_scope':>10} {'loss layer MB':>14} {'[S x V] logits MB':>18}")
    for prompt in a.prompts:
        for scope in ("responses", "full"):
            r = _launch(["loss", str(prompt), scope], 1)[0]
            print(
                f"{prompt:>7} {scope:>10} {r['loss_layer_mb']:>14.1f} {r['full_logits_mb']:>18.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
