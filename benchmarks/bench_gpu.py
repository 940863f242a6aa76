"""One GPU, side by side: the project's LongPO step vs the same step done the authors' way.

- ``project``: a Mistral-shaped ~1B model built by :func:`build_model` (local spec, SDPA flash
  attention), bf16 with fp32 main params, megatron's engine (schedules, Megatron DDP, distributed
  optimizer), the chunked loss layer (logits only where labels count); the reference log-probs
  are precomputed (scored once before training), so the step is the policy's alone.
- ``authors``: the same shapes as a transformers ``MistralForCausalLM`` from a config (random
  weights, SDPA), bf16 weights and torch AdamW, full ``[2, S, V]`` logits → float log-softmax, and
  a frozen reference forward on the short prompts in every step — how the authors' DPO-style
  trainer does it.

One pair (chosen + rejected rows) of S tokens per step at S = 8K, 32K, 64K; full recompute
(gradient checkpointing on the authors' side) from 16K up. Reported per row: step time, tokens/s
(2·S / step time), MFU from :mod:`longpo_megatron.flops` (model FLOPs, recompute not counted;
each side counts the logits it computes and its reference forward), peak memory allocated, and
the project/authors tokens/s ratio. Rows are written to ``--json`` after every case, so a run
stopped by ``--deadline`` (or SIGINT) still reports what it measured.

    python benchmarks/bench_gpu.py [--seq 8192 32768 65536] [--json F] [--table F] [--deadline T]
    python benchmarks/bench_gpu.py --cpu-smoke     (toy model on CPU: the logic, not the speed)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import signal
import socket
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longpo_megatron import flops  # noqa: E402
from longpo_megatron.config import LongPOConfig, ModelConfig, OptimConfig  # noqa: E402

MISTRAL_1B = ModelConfig(
    name="mistral-1b",
    family="mistral",
    num_layers=16,
    hidden_size=2048,
    ffn_hidden_size=7168,
    num_attention_heads=16,
    num_query_groups=4,
    vocab_size=32000,
    max_position_embeddings=131072,
    rotary_base=1e6,
)
"""Mistral-7B's shape scaled to ~1B parameters (GQA 4:1, head dim 128, SwiGLU 3.5×)."""
TOY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, vocab_size=264)
"""--cpu-smoke model."""
RECOMPUTE_FROM = 16384
"""Sequences at least this long run with full recompute on both sides (--recompute-from)."""
HYPER = LongPOConfig(beta=0.1, lam=0.5)


class DeadlineReached(Exception):
    """Raised by SIGALRM at --deadline: stop and report what was measured."""


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise DeadlineReached


def parameters(m: ModelConfig) -> int:
    """Parameter count (untied embeddings, no biases)."""
    d = flops.Dims.of(m)
    per_layer = d.linear_per_token // (2 * d.layers) + 2 * d.hidden
    return d.layers * per_layer + 2 * d.vocab * d.hidden + d.hidden


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of a GPU named like one in :data:`flops.PEAK_FLOPS`, else None."""
    name = device_name.lower()
    return next((v for k, v in flops.PEAK_FLOPS.items() if k in name), None)


def shapes(seq: int, short_fraction: float) -> tuple[int, int]:
    """(response tokens, short-prompt sequence length) of one pair of ``seq`` tokens."""
    resp = max(1, min(1024, seq // 8))
    return resp, max(resp + 1, int(seq * short_fraction))


def pair(seq: int, resp: int, vocab: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Chosen and rejected rows: one shared prompt, different responses of ``resp`` tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, seq), generator=g)
    tokens[1, : seq - resp] = tokens[0, : seq - resp]
    mask = torch.zeros(2, seq)
    mask[:, seq - resp - 1 : seq - 1] = 1.0  # labels are the next tokens: the response's
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(2, seq).contiguous(),
        "labels": torch.roll(tokens, -1, 1),
        "response_mask": mask,
        "real_mask": torch.ones(2, seq),
        "ref_logps": torch.tensor([-1.2 * resp, -1.3 * resp]),
    }
    return {k: v.to(device) for k, v in batch.items()}


# ---- the two steps ---------------------------------------------------------------------------


def project_runner(m: ModelConfig, seq: int, cuda: bool, groups):
    """(step function, model FLOPs per step) of the project path."""
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    layout = ModelLayout(
        1, 1, 1, False, "local", "gpu" if cuda else "cpu", "bf16" if cuda else "fp32"
    )
    model = build_model(m, layout, groups)
    optim = OptimConfig(lr=1e-5)
    if cuda:
        from longpo_megatron.schedule.megatron_engine import MegatronEngine

        engine = MegatronEngine(model, groups, optim, micro_pairs=1)
    else:
        engine = CpuEngine(model, groups, optim)
    forward_step = make_train_forward_step(LongPOLossLayer(HYPER, LossGroups(groups.tp, groups.cp)))
    resp, _ = shapes(seq, 0.25)
    batch = pair(seq, resp, m.vocab_size, next(model.parameters()).device, seed=seq)
    dims = flops.Dims.of(m)
    step_flops = flops.step_flops(flops.sequences_forward_flops(dims, [seq, seq], seq + resp))

    def step() -> float:
        result = engine.train_step(forward_step, [batch], 1e-5)
        return float(sum(float(x["loss"].sum()) for x in result.metrics))

    return step, step_flops


def _hf_model(m: ModelConfig, device: torch.device, dtype: torch.dtype, recompute: bool):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rotary_base,
        sliding_window=None,
        tie_word_embeddings=False,
        use_cache=False,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(device=device, dtype=dtype)
    if recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _token_logps(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full logits → float log-softmax → the next token's log-prob (authors' style)."""
    logits = model(input_ids=tokens).logits[:, :-1]
    return torch.gather(logits.float().log_softmax(-1), 2, tokens[:, 1:, None]).squeeze(-1)


def authors_runner(m: ModelConfig, seq: int, cuda: bool, short_fraction: float):
    """(step function, model FLOPs per step) of the transformers, full-logits path."""
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = _hf_model(m, device, dtype, m.recompute == "full")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=cuda)
    resp, short = shapes(seq, short_fraction)
    long_b = pair(seq, resp, m.vocab_size, device, seed=seq)
    short_b = pair(short, resp, m.vocab_size, device, seed=seq + 1)
    real = long_b["real_mask"][0, 1:]
    dims = flops.Dims.of(m)
    step_flops = flops.step_flops(
        flops.sequences_forward_flops(dims, [seq, seq], 2 * seq),
        flops.sequences_forward_flops(dims, [short, short], 2 * short),
    )

    def step() -> float:
        logps = _token_logps(model, long_b["tokens"])
        with torch.no_grad():
            ref = _token_logps(reference, short_b["tokens"]) * short_b["response_mask"][:, :-1]
        policy = (logps * long_b["response_mask"][:, :-1]).sum(-1)
        nll = -(logps[0] * real).sum() / real.sum()
        ref_sums = ref.sum(-1)
        margin = HYPER.beta * ((policy[0] - ref_sums[0]) - (policy[1] - ref_sums[1]))
        loss = nll - HYPER.lam * F.logsigmoid(margin)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, step_flops


# ---- timing, rows, table ----------------------------------------------------------------------


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def measure(step, cuda: bool, warmup: int, steps: int) -> dict[str, float]:
    """Median step time over ``steps`` timed steps after ``warmup``; the run's peak memory."""
    for _ in range(warmup):
        step()
    _sync(cuda)
    times, loss = [], math.nan
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(cuda)
        times.append(time.perf_counter() - t0)
    times.sort()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water
    return {"step_s": times[len(times) // 2], "loss": loss, "peak_gib": peak}


def run_case(args, impl: str, seq: int, m: ModelConfig, cuda: bool, groups) -> dict[str, Any]:
    """One (implementation, length) row; failures (OOM included) become a row's status."""
    row: dict[str, Any] = {"impl": impl, "seq": seq, "recompute": seq >= args.recompute_from}
    gc.collect()  # the previous case's models (reference cycles) before measuring this one
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        mm = replace(m, recompute="full" if row["recompute"] else "none")
        if impl == "project":
            step, fl = project_runner(mm, seq, cuda, groups)
        else:
            step, fl = authors_runner(mm, seq, cuda, args.short_fraction)
        row |= measure(step, cuda, args.warmup, args.steps) | {"step_flops": fl}
        row["tokens_per_s"] = 2 * seq / row["step_s"]
        peak = args.peak_flops
        row["mfu"] = flops.mfu(fl, row["step_s"], 1, peak) if peak else None
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except (DeadlineReached, KeyboardInterrupt):
        row["status"] = "stopped (deadline)"
        raise _Stop(row) from None
    except Exception as e:  # a broken case is reported (traceback in the log), the others run
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    finally:
        row["wall_s"] = time.perf_counter() - t0
    return row


def estimate_s(rows: list[dict[str, Any]], impl: str, seq: int) -> Optional[float]:
    """Wall time of the next case from the last one of ``impl`` (time grows as seq^1.5)."""
    done = [r for r in rows if r["impl"] == impl and r.get("status") == "ok"]
    if not done:
        return None
    last = done[-1]
    return last["wall_s"] * (seq / last["seq"]) ** 1.5


def not_started(impl: str, seq: int, recompute: bool, why: str) -> dict[str, Any]:
    return {"impl": impl, "seq": seq, "recompute": recompute, "status": f"not started: {why}"}


class _Stop(Exception):
    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__(row["status"])
        self.row = row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup`` = project tokens/s ÷ authors' tokens/s at the same length."""
    by = {(r["impl"], r["seq"]): r for r in rows if r.get("status") == "ok"}
    for (_, seq), r in by.items():
        other = by.get(("authors", seq))
        r["speedup"] = r["tokens_per_s"] / other["tokens_per_s"] if other else None


def table(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows, with the run's device and model on top."""
    head = (
        f"{meta['device']}; model {meta['model']} ({meta['params'] / 1e9:.2f} B params), "
        f"{meta['dtype']}; {meta['steps']} timed steps after {meta['warmup']} warm-up "
        f"(median); MFU peak {meta['peak_tflops'] or 'n/a'} TFLOP/s"
    )
    lines = [
        head,
        "",
        "| impl | seq | recompute | step s | tokens/s | MFU | peak GiB | "
        "project/authors | status |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"

    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r['impl']} | {r['seq']} | {'full' if r['recompute'] else 'none'} | "
            f"{f(r.get('step_s'), '.3f')} | {f(r.get('tokens_per_s'), ',.0f')} | {mfu} | "
            f"{f(r.get('peak_gib'), '.2f')} | {f(r.get('speedup'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def write(args, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    add_ratios(rows)
    text = table(meta, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.table:
        Path(args.table).write_text(text)
    return text


def _groups(cuda: bool):
    """A one-rank world (NCCL for CUDA tensors, gloo for CPU) and megatron's groups."""
    import torch.distributed as dist

    from longpo_megatron.distributed import init_model_parallel, seed_all

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=0, world_size=1)
    groups = init_model_parallel(1, 1, 1)
    seed_all(0, groups, cuda=cuda)
    return groups


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", help="tokens per sequence (default 8K 32K 64K)")
    ap.add_argument(
        "--impl", nargs="+", default=["project", "authors"], choices=["project", "authors"]
    )
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--short-fraction",
        type=float,
        default=0.25,
        help="authors' reference forward: short prompt length / long length",
    )
    ap.add_argument("--recompute-from", type=int, help="full recompute from this length on")
    ap.add_argument("--deadline", type=float, help="unix time to stop at, reporting what ran")
    ap.add_argument("--json", help="write {meta, rows} here after every case")
    ap.add_argument("--table", help="write the markdown table here")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="toy model on CPU (fp32, CPU engine): checks the logic, not the speed",
    )
    args = ap.parse_args(argv)
    args.seq = args.seq or ([64, 128] if args.cpu_smoke else [8192, 32768, 65536])
    if args.recompute_from is None:
        args.recompute_from = 128 if args.cpu_smoke else RECOMPUTE_FROM
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("error: no CUDA device; use --cpu-smoke for the toy CPU run", file=sys.stderr)
        return 2
    model = TOY if args.cpu_smoke else MISTRAL_1B
    device = torch.cuda.get_device_name(0) if cuda else "CPU (smoke)"
    args.peak_flops = peak_flops(device) if cuda else None
    meta = {
        "device": device,
        "torch": torch.__version__,
        "model": model.name,
        "params": parameters(model),
        "dtype": "bf16" if cuda else "fp32",
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak_flops / 1e12 if args.peak_flops else None,
        "short_fraction": args.short_fraction,
        "memory": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "complete": False,
    }
    if args.deadline and args.deadline > time.time():
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(max(1, int(args.deadline - time.time())))
    groups, rows = None, []
    try:
        for seq in sorted(args.seq):
            for impl in args.impl:
                left = args.deadline - time.time() if args.deadline else math.inf
                est = estimate_s(rows, impl, seq)
                if left <= 0 or (est is not None and est > left):
                    why = f"{max(left, 0):.0f} s left" + (f", estimated {est:.0f} s" if est else "")
                    raise _Stop(not_started(impl, seq, seq >= args.recompute_from, why))
                groups = groups or _groups(cuda)
                print(f"{impl} seq={seq}: starting", flush=True)
                rows.append(run_case(args, impl, seq, model, cuda, groups))
                print(f"{impl} seq={seq}: {rows[-1]['status']} ({rows[-1]['wall_s']:.1f} s)")
                write(args, meta, rows)
        meta["complete"] = True
    except _Stop as stop:
        rows.append(stop.row)
    except (DeadlineReached, KeyboardInterrupt):
        pass  # between cases: every finished row is already in rows
    signal.alarm(0)
    print(write(args, meta, rows))
    if not meta["complete"]:
        print("bench: stopped at the deadline; the table holds what was measured")
        return 4
    # OOM is a measurement (that way does not fit on this GPU); an error is a broken case
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
