"""Shared-prefix packing vs two sequences: step time and activation memory, side by side.

One process, one rank, fp32, the tiny model on CPU. For each prompt/response length ratio the same
synthetic pair (one prompt, two responses of ``--response`` tokens) is trained as two sequences
(today's layout) and packed as [prompt | chosen | rejected] (``data.shared_prefix``):
    .venv/bin/python benchmarks/bench_shared_prefix.py [--ratios 4 16 64] [--response 64]
        [--steps 5] [--clock cpu|wall] [--profile 15]
Step time is the median over ``--steps`` rounds; each round runs every layout once, in turn,
so the load of a shared machine falls on all of them alike. ``--clock cpu`` (default) times
the process's CPU time, which other processes on the machine do not inflate (one thread:
OMP_NUM_THREADS=1); ``wall`` times elapsed seconds. ``--profile N`` also prints, per ratio, the
N operators with the most self CPU time in one step of each layout (torch.profiler), side by
side: where the time goes.
Activation memory is the bytes of the distinct tensors (parameters excluded) autograd saves
for backward during the forward + loss (what a step holds at its peak besides weights,
gradients and optimizer state).
The ``authors`` row is the step as the LongPO authors' code does it (a transformers model of the
same dims, chosen and rejected as a batch of two with full logits, the reference forward on the
short prompts every step); ratios are against the project's two-sequence step.
Goal (issue 13): packed ≥ 1.8× faster and ≤ 0.55× activation memory at ratio ≥ 16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

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


def _saved_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]):
    """``(forward(), bytes)``: the distinct non-parameter storages that tensors saved for
    backward during ``forward`` still hold when it returns (a tensor saved by a part of the
    graph freed on the way is not counted, nor an address reused after it)."""
    import weakref

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in params:  # weights are not activations
            saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    alive = [t for t in (r() for r in saved) if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
    return out, sum(storages.values())


def _activation_bytes(model, step, batch) -> int:
    """Bytes saved for backward by one forward + loss (:func:`_saved_bytes`)."""

    def forward() -> torch.Tensor:
        output, loss_func = step(iter([batch]), model)
        return loss_func(output)[0]

    loss, nbytes = _saved_bytes(model, forward)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return nbytes


def _timed(steps: dict[str, Callable[[], None]], rounds: int, clock: str) -> dict[str, float]:
    """Median seconds of one call of each step, the steps run round-robin after a warm-up."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _profile(steps: dict[str, Callable[[], None]], top: int) -> None:
    """Print the ``top`` operators by self CPU time of one call of each step, side by side."""
    from torch.profiler import ProfilerActivity, profile

    self_ms: dict[str, dict[str, float]] = {}
    for name, fn in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        self_ms[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    ops = sorted({k for v in self_ms.values() for k in v}, key=lambda k: -max(
        v.get(k, 0.0) for v in self_ms.values()
    ))  # fmt: skip
    print(f"  {'operator (self CPU ms)':<58}" + "".join(f"{n:>10}" for n in steps))
    for op in ops[:top]:
        print(f"  {op[:58]:<58}" + "".join(f"{self_ms[n].get(op, 0.0):>10.1f}" for n in steps))
    print(f"  {'total':<58}" + "".join(f"{sum(self_ms[n].values()):>10.1f}" for n in steps))


def _authors_step(pair, short: int) -> tuple[Callable[[], None], int]:
    """The step as the authors' code does it: a transformers model of the same dims, chosen
    and rejected as a batch of two with full logits, and the frozen reference's forward on the
    two short prompts (``short`` tokens + the responses) every step.
    (one optimizer step, activation bytes)"""
    import copy

    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=264,
        max_position_embeddings=32768,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.tensor([pair.chosen, pair.rejected])
    resp = torch.tensor([pair.chosen_response_mask, pair.rejected_response_mask])[:, 1:].float()
    response = int(resp[0].sum())
    short_ids = torch.cat([tokens[:, :short], tokens[:, -response:]], dim=1)

    def logps(m, ids, mask):
        logits = m(ids).logits[:, :-1].float()
        lp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(-1)
        return (lp * mask).sum(-1), lp

    def loss_of_step() -> torch.Tensor:
        with torch.no_grad():
            ref_sums, _ = logps(ref, short_ids, torch.ones(2, short_ids.shape[1] - 1))
        sums, lp = logps(model, tokens, resp)
        delta = 0.1 * ((sums[0] - ref_sums[0]) - (sums[1] - ref_sums[1]))
        return -lp[0].mean() - F.logsigmoid(delta)

    loss, nbytes = _saved_bytes(model, loss_of_step)
    loss.backward()
    opt.zero_grad()

    def step() -> None:
        loss_of_step().backward()
        opt.step()
        opt.zero_grad()

    return step, nbytes


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
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (median)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--profile", type=int, default=0, help="print the top N operators")
    ap.add_argument(
        "--no-authors", dest="authors", action="store_false", help="skip the transformers row"
    )
    ap.add_argument("--short", type=int, default=128, help="short reference prompt (authors)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, engine, step = _setup()
    print(
        f"{'ratio':>5} {'prompt':>6} {'layout':>8} {'tokens':>7} {'step ms':>9} "
        f"{'act MB':>8} {'speed-up':>9} {'act ratio':>10}"
    )
    for ratio in args.ratios:
        pair = _pair(ratio * args.response, args.response)
        steps, rows = {}, {}
        for name, packed in (("two-seq", False), ("shared", True)):
            batch = _batch(pair, packed)
            rows[name] = (int(batch["tokens"].numel()), _activation_bytes(model, step, batch))
            steps[name] = lambda b=batch: engine.train_step(step, [b], 1e-4)
        if args.authors:
            steps["authors"], mem = _authors_step(pair, args.short)
            rows["authors"] = (2 * len(pair.chosen), mem)
        secs = _timed(steps, args.steps, args.clock)
        base_t, base_m = secs["two-seq"], rows["two-seq"][1]
        for name, (tokens, mem) in rows.items():
            print(
                f"{ratio:>5} {ratio * args.response:>6} {name:>8} {tokens:>7} "
                f"{secs[name] * 1e3:>9.1f} {mem / 2**20:>8.1f} {base_t / secs[name]:>8.2f}x "
                f"{mem / base_m:>9.2f}x",
                flush=True,
            )
        if args.profile:
            _profile(steps, args.profile)


if __name__ == "__main__":
    main()
