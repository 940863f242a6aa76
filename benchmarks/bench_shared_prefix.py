"""Shared-prefix packing vs two sequences: step time and activation memory, side by side.

One process, one rank, fp32, the tiny model on CPU. For each prompt/response length ratio the same
synthetic pair (one prompt, two responses of ``--response`` tokens) is trained as two sequences
(today's layout) and packed as [prompt | chosen | rejected] (``data.shared_prefix``):
    .venv/bin/python benchmarks/bench_shared_prefix.py [--ratios 4 16 64] [--response 64]
Activation memory is the bytes of the distinct tensors (parameters excluded) autograd saves
for backward during the forward + loss (what a step holds at its peak besides weights,
gradients and optimizer state).
Goal (issue 13): packed ≥ 1.8× faster and ≤ 0.55× activation memory at ratio ≥ 16.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _pair(prompt: int, response: int):
    """A synthetic pair: a prompt, then two different responses (response-mask on them)."""
    from longpo_megatron.data.tokenize import TokenizedPair

    g = torch.Generator().manual_seed(prompt)
    head = torch.randint(0, 200, (prompt,), generator=g).tolist()
    chosen = torch.randint(200, 228, (response,), generator=g).tolist()
    rejected = torch.randint(228, 256, (response,), generator=g).tolist()
    mask = [False] * prompt + [True] * response
    return TokenizedPair(0, head + chosen, head + rejected, mask, list(mask))


def _batch(pair, packed: bool) -> dict:
    from longpo_megatron.context_parallel import split_batch
    from longpo_megatron.data.collate import collate_pairs, collate_shared_prefix

    collate = collate_shared_prefix if packed else collate_pairs
    return split_batch(collate([pair], 256, 8, [(-100.0, -110.0)]), 0, 1)


def _activation_bytes(model, step, batch) -> int:
    """Bytes of the distinct non-parameter tensors saved for backward by one forward + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # weights are not activations
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output, loss_func = step(iter([batch]), model)
        loss, _ = loss_func(output)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _step_seconds(engine, step, batch, steps: int) -> float:
    engine.train_step(step, [batch], 1e-4)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_step(step, [batch], 1e-4)
    return (time.perf_counter() - t0) / steps


def _setup():
    import torch.distributed as dist

    from longpo_megatron.config import LongPOConfig, ModelConfig, OptimConfig
    from longpo_megatron.distributed import init_model_parallel
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29731")
    dist.init_process_group("gloo", rank=0, world_size=1)
    groups = init_model_parallel(1, 1, 1)
    torch.manual_seed(0)
    mcfg = ModelConfig(
        num_layers=4, hidden_size=128, ffn_hidden_size=352, max_position_embeddings=32768
    )
    model = build_model(mcfg, ModelLayout(1, 1, 1, False, "local", "cpu", "fp32"), groups)
    engine = CpuEngine(model, groups, OptimConfig(lr=1e-4))
    step = make_train_forward_step(
        LongPOLossLayer(LongPOConfig(), LossGroups(groups.tp, groups.cp))
    )
    return model, engine, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratios", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, engine, step = _setup()
    print(
        f"{'ratio':>5} {'prompt':>6} {'layout':>8} {'tokens':>7} {'step ms':>9} "
        f"{'act MB':>8} {'speed-up':>9} {'act ratio':>10}"
    )
    for ratio in args.ratios:
        pair = _pair(ratio * args.response, args.response)
        rows = {}
        for name, packed in (("two-seq", False), ("shared", True)):
            batch = _batch(pair, packed)
            mem = _activation_bytes(model, step, batch)
            rows[name] = (
                int(batch["tokens"].numel()),
                _step_seconds(engine, step, batch, args.steps),
                mem,
            )
        base_t, base_m = rows["two-seq"][1], rows["two-seq"][2]
        for name, (tokens, secs, mem) in rows.items():
            print(
                f"{ratio:>5} {ratio * args.response:>6} {name:>8} {tokens:>7} {secs * 1e3:>9.1f} "
                f"{mem / 2**20:>8.1f} {base_t / secs:>8.2f}x {mem / base_m:>9.2f}x"
            )


if __name__ == "__main__":
    main()
