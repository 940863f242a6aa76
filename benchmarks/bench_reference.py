"""Memory of the frozen reference vs the policy's training state (one rank, fp32, CPU).

The reference holds weights only (no gradients, no optimizer state); the policy holds weights,
gradients and two AdamW moments. Prints bytes counted from tensors and the RSS each adds.

    .venv/bin/python benchmarks/bench_reference.py [--layers 8 --hidden 512]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    from longpo_megatron.config import Config
    from longpo_megatron.distributed import init_model_parallel
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.reference import ReferenceScorer
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    a = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29633")
    dist.init_process_group("gloo", rank=0, world_size=1)
    g = init_model_parallel(1, 1, 1)
    cfg = Config()
    cfg.model.num_layers, cfg.model.hidden_size = a.layers, a.hidden
    cfg.model.ffn_hidden_size, cfg.model.num_attention_heads = 3 * a.hidden, 8
    cfg.model.num_query_groups = 4
    layout = ModelLayout(1, 1, 1, False, "local", "cpu", "fp32")
    r0 = _rss_mb()
    policy = build_model(cfg.model, layout, g)
    engine = CpuEngine(policy, g, cfg.optim)
    step = make_train_forward_step(LongPOLossLayer(cfg.longpo, LossGroups(g.tp, g.cp)))
    tokens = torch.randint(0, 256, (2, 64))
    batch = {"tokens": tokens, "position_ids": torch.arange(64).expand(2, 64),
             "labels": tokens.roll(-1, 1), "response_mask": torch.ones(2, 64),
             "real_mask": torch.ones(2, 64), "ref_logps": torch.zeros(2)}  # fmt: skip
    engine.train_step(step, [batch], 1e-4)
    r1 = _rss_mb()
    params = list(policy.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for s in engine.optimizer.state.values() for v in s.values() if v.dim() > 0]
    ref = ReferenceScorer(cfg, layout, g, policy.state_dict(), pad_id=256)
    r2 = _rss_mb()
    ref_params = list(ref.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in ref_params)
    print(
        f"{'':>22} {'params MB':>10} {'grads MB':>9} {'Adam MB':>8} {'total MB':>9} {'RSS +MB':>8}"
    )
    pol = (_mb(params), _mb(grads), _mb(moments))
    print(
        f"{'policy (training)':>22} {pol[0]:>10.1f} {pol[1]:>9.1f} {pol[2]:>8.1f} "
        f"{sum(pol):>9.1f} {r1 - r0:>8.1f}"
    )
    print(
        f"{'reference (frozen)':>22} {_mb(ref_params):>10.1f} {0:>9.1f} {0:>8.1f} "
        f"{_mb(ref_params):>9.1f} {r2 - r1:>8.1f}"
    )
    print(f"reference / policy training state: {_mb(ref_params) / sum(pol):.2f}")


if __name__ == "__main__":
    main()
