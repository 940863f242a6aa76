"""``longpo-plan``: every TP/PP/CP/DP layout for a model, a sequence length and a GPU budget, with
the memory each GPU needs, the FLOPs of a step, the step time at a given MFU and a recommendation.

Memory per rank (bytes; ``P`` = parameters on the rank's heaviest pipeline stage, TP-sharded):

* weights: ``P × 2`` (bf16, gpu engine) or ``P × 4`` (fp32, cpu engine);
* gradients: megatron's fp32 grad buffer ``P × 4`` (gpu) or fp32 ``param.grad`` (cpu);
* optimizer: fp32 master weights + Adam m, v = ``P × 12``, sharded over DP×CP by the
  distributed optimizer (gpu); torch AdamW's m, v = ``P × 8`` (cpu, unsharded, the fp32 weights
  are the master copy);
* activations: the tensors autograd keeps per layer and token (:func:`saved_per_token`), for
  the ``2 × micro_batch × S / CP`` tokens of a micro-batch on the rank, times the micro-batches
  in flight (1F1B: ``min(PP, accumulation)``; the cpu engine's GPipe: all of them). ``full``
  recompute keeps only each layer's input plus one layer's activations in backward;
  ``selective`` keeps the core attention's inputs instead of its internals;
* the chunked loss: ``logits_chunk × vocab/TP`` fp32 logits, their exponentials and gradient,
  plus the fp32 hidden rows whose labels count;
* the online reference: a second, frozen copy of the weights (bf16 / fp32), no activations kept.

FLOPs come from :mod:`longpo_megatron.flops` (the documented model-FLOP formula).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from longpo_megatron import flops
from longpo_megatron.config import ModelConfig
from longpo_megatron.config_validation import sequence_multiple
from longpo_megatron.errors import UserError, report_user_errors

GIB = 2**30
CONF_MODELS = Path(__file__).resolve().parent.parent / "conf" / "model"
HEADROOM = 0.9
"""A layout fits when its estimate is at most this fraction of GPU memory (allocator slack,
NCCL/TE workspaces, CUDA context)."""


class PlanError(UserError, ValueError):
    """A planning request that cannot be met (names the limit that was broken)."""


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for."""

    model: ModelConfig
    """The architecture (a conf/model preset)."""
    seq_len: int
    """Padded length of each long (chosen / rejected) sequence."""
    gpus: int
    """GPUs in total (the world size)."""
    gpu_mem_gib: float
    """Memory per GPU, GiB."""
    micro_batch: int = 1
    """Pairs per micro-batch (2 rows: chosen and rejected)."""
    global_batch: int = 8
    """Pairs per optimizer step."""
    recompute: str = "full"
    """Activation recomputation: none | selective | full."""
    reference: str = "initial_policy"
    """initial_policy | precomputed (no reference weights while training) | online."""
    ref_seq_len: Optional[int] = None
    """Short reference sequence length (online reference, FLOPs); null = min(S, 32768)."""
    engine: str = "gpu"
    """gpu (bf16, megatron DDP + distributed optimizer, TE attention) | cpu (fp32, local)."""
    distributed_optimizer: bool = True
    """gpu engine: shard the optimizer state over DP×CP."""
    logits_chunk: int = 1024
    """longpo.logits_chunk_size: positions per output-layer chunk."""
    gpus_per_node: int = 8
    """TP stays inside a node."""
    mfu: float = 0.4
    """Model FLOPs utilisation assumed for the step time."""
    peak_flops: float = flops.PEAK_FLOPS["h100"]
    """Dense bf16 peak FLOP/s of one GPU."""
    shared_prefix_branch: Optional[int] = None
    """data.shared_prefix: tokens of each branch after the shared prompt (one packed row of
    S + branch tokens per pair, project attention); null = two sequences of S per pair."""

    @property
    def packed(self) -> bool:
        """Pairs run as packed shared-prefix rows."""
        return self.shared_prefix_branch is not None

    @property
    def tokens_per_pair(self) -> int:
        """Policy tokens of one pair: 2·S, or S + branch when packed."""
        return self.seq_len + self.shared_prefix_branch if self.packed else 2 * self.seq_len


@dataclass(frozen=True)
class Layout:
    """One process layout (world = TP·PP·CP·DP)."""

    tp: int
    pp: int
    cp: int
    dp: int

    def __str__(self) -> str:
        return f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}"


@dataclass(frozen=True)
class Memory:
    """Estimated bytes per GPU, by what holds them."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    loss: float
    reference: float

    @property
    def total(self) -> float:
        """Everything together."""
        parts = (self.weights, self.grads, self.optimizer, self.activations, self.loss)
        return sum(parts) + self.reference


def stage_params(m: ModelConfig, tp: int, pp: int) -> int:
    """Parameters one TP rank of the heaviest pipeline stage holds."""
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    h, f = m.hidden_size, m.ffn_hidden_size
    qkv_out = (m.num_attention_heads + 2 * m.num_query_groups) * d
    sharded = h * qkv_out + m.num_attention_heads * d * h + 3 * h * f
    sharded += qkv_out if m.add_qkv_bias else 0
    layers = (m.num_layers // pp) * (sharded // tp + 2 * h)
    embed = m.vocab_size * h // tp
    if pp == 1:
        return layers + embed * (1 if m.tie_word_embeddings else 2) + h
    return layers + embed + h  # first stage: embedding; last: output layer + final norm


def saved_per_token(
    m: ModelConfig, lay: Layout, sp: bool, backend: str, recompute: str, micro_batch: int
) -> float:
    """Values autograd keeps per token for one layer (recompute none or selective).

    * norms + linear inputs: the local backend's torch RMSNorm keeps its input and normalised
      output, then QKV / fc1 keep the scaled output (3h per norm); TE's fused norm+linear keeps
      input and normalised output (2h). ÷TP under sequence parallelism;
    * core attention (``packed``: the project attention on shared-prefix rows, local norms and
      MLP; without CP its prompt/branch kernels or FlexAttention keep q, k, v, the output and
      a log-sum-exp, as TE does; under CP as local):
      the local backend keeps q and k, v expanded to the query heads plus a
      log-sum-exp (its blockwise path under CP: q, the output, and k, v of the WHOLE sequence,
      gathered); TE keeps q, k, v, output and log-sum-exp; selective recompute keeps the
      core attention's inputs q, k, v instead;
    * the output projection's input; SwiGLU: fc1's output (gate, up), silu(gate), their product
      and fc2's input (5f, TP-sharded; TE's fused activation: 3f);
    * RoPE: cos and sin for q and k per position, shared by the 2·micro_batch rows.
    """
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    h, f = m.hidden_size, m.ffn_hidden_size
    nq, nkv = m.num_attention_heads / lay.tp, m.num_query_groups / lay.tp
    per_norm = 2 * h if backend == "te" else 3 * h
    norms = 2 * per_norm / (lay.tp if sp else 1) + 2
    if recompute == "selective":
        core = (nq + 2 * nkv) * d
    elif backend == "te" or (backend == "packed" and lay.cp == 1):
        core = 2 * nq * d + 2 * nkv * d + nq
    elif lay.cp > 1:
        core = 2 * nq * d + 2 * nkv * d * lay.cp + nq
    else:
        core = 3 * nq * d + nq
    mlp = (3 if backend == "te" else 5) * f / lay.tp
    rope = 4 * d / (2 * micro_batch)
    return norms + core + nq * d + mlp + rope


def backward_working(m: ModelConfig, lay: Layout, sp: bool) -> float:
    """Values per token alive at once while one layer runs backward: the gradient of fc1's
    output and of the layer input."""
    return 2 * m.ffn_hidden_size / lay.tp + m.hidden_size / (lay.tp if sp else 1)


def activation_bytes(req: PlanRequest, lay: Layout, in_flight: int, sp: bool) -> float:
    """Saved activations of the heaviest stage plus the backward working set."""
    m = req.model
    backend = "packed" if req.packed else "te" if req.engine == "gpu" else "local"
    dtype = 2 if req.engine == "gpu" else 4
    tokens = req.micro_batch * req.tokens_per_pair / lay.cp
    layers = m.num_layers // lay.pp
    working = tokens * backward_working(m, lay, sp) * dtype
    if req.recompute == "full":  # each layer's input; one layer recomputed in backward
        one_layer = saved_per_token(m, lay, sp, backend, "none", req.micro_batch)
        inputs = layers * m.hidden_size / (lay.tp if sp else 1)
        return (in_flight * inputs + one_layer) * tokens * dtype + working
    layer = saved_per_token(m, lay, sp, backend, req.recompute, req.micro_batch)
    return in_flight * tokens * layers * layer * dtype + working


def loss_bytes(req: PlanRequest, lay: Layout) -> float:
    """The chunked loss: one chunk's fp32 logits, exponentials and gradient, plus the fp32 hidden
    rows whose labels count (≈ the chosen sequence: its NLL covers every token)."""
    m = req.model
    chunk = 3 * min(req.logits_chunk, req.seq_len) * m.vocab_size / lay.tp * 4
    rows = req.micro_batch * req.seq_len / lay.cp * m.hidden_size * 4
    return chunk + rows


def estimate(req: PlanRequest, lay: Layout) -> Memory:
    """Per-GPU memory of ``lay`` (bytes)."""
    params = stage_params(req.model, lay.tp, lay.pp)
    gpu = req.engine == "gpu"
    sp = gpu and lay.tp > 1
    accum = req.global_batch // (req.micro_batch * lay.dp)
    if lay.pp == 1:
        in_flight = 1
    else:
        in_flight = min(lay.pp, accum) if gpu else accum
    if gpu:
        shards = lay.dp * lay.cp if req.distributed_optimizer else 1
        weights, grads, optimizer = 2 * params, 4 * params, 12 * params / shards
    else:
        weights, grads, optimizer = 4 * params, 4 * params, 8 * params
    return Memory(
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=activation_bytes(req, lay, in_flight, sp),
        loss=loss_bytes(req, lay),
        reference=weights if req.reference == "online" else 0.0,
    )


def layouts(req: PlanRequest) -> tuple[list[Layout], list[str]]:
    """Every layout megatron can build for ``req`` and, for the sizes left out, why."""
    m, why = req.model, []
    tps = [t for t in _divisors(req.gpus) if t <= req.gpus_per_node]
    for t in list(tps):
        bad = [
            f"{k}={v}"
            for k, v in (
                ("num_attention_heads", m.num_attention_heads),
                ("num_query_groups", m.num_query_groups),
                ("vocab_size", m.vocab_size),
                ("ffn_hidden_size", m.ffn_hidden_size),
            )
            if v % t
        ]
        if bad:
            tps.remove(t)
            why.append(f"TP={t} does not divide {', '.join(bad)}")
    out = []
    for tp in tps:
        for pp in _divisors(req.gpus // tp):
            if m.num_layers % pp or (pp > 1 and m.tie_word_embeddings):
                continue
            for cp in _divisors(req.gpus // (tp * pp)):
                dp = req.gpus // (tp * pp * cp)
                multiple = sequence_multiple(tp, cp, req.engine == "gpu" and tp > 1)
                if req.seq_len % multiple or req.global_batch % (req.micro_batch * dp):
                    continue
                out.append(Layout(tp, pp, cp, dp))
    return out, why


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def step_flops(req: PlanRequest) -> float:
    """Model FLOPs of one optimizer step (:mod:`longpo_megatron.flops`): chosen and rejected
    rows of length S per pair, log-probs at every position; the reference scores a chosen and a
    rejected short sequence per pair (forward only)."""
    dims = flops.Dims.of(req.model)
    rows = 2 * req.global_batch
    policy = flops.sequences_forward_flops(dims, [req.seq_len] * rows, rows * req.seq_len)
    if req.packed:  # the prompt once; each branch attends to it and to itself
        b = req.shared_prefix_branch
        pairs = flops.shared_prefix_pairs(req.seq_len - b, [b, b]) * req.global_batch
        tokens = req.tokens_per_pair * req.global_batch
        policy = flops.forward_flops(dims, tokens, pairs, rows * req.seq_len)
    ref_len = req.ref_seq_len or min(req.seq_len, 32768)
    reference = flops.sequences_forward_flops(dims, [ref_len] * rows, rows * ref_len)
    return flops.step_flops(policy, reference)


@dataclass(frozen=True)
class PlanRow:
    """One layout with its memory estimate and whether it fits."""

    layout: Layout
    memory: Memory
    fits: bool


def plan(req: PlanRequest) -> tuple[list[PlanRow], PlanRow]:
    """All layouts (estimated) and the recommended one; raises :class:`PlanError` when none can
    run or none fits, naming why."""
    if req.seq_len < 1 or req.gpus < 1 or req.gpu_mem_gib <= 0 or not 0 < req.mfu <= 1:
        raise PlanError(
            f"seq_len={req.seq_len}, gpus={req.gpus}, gpu_mem={req.gpu_mem_gib} GiB, "
            f"mfu={req.mfu}: need positive sizes and 0 < mfu <= 1"
        )
    if req.packed and not 0 < req.shared_prefix_branch < req.seq_len:
        raise PlanError(
            f"--shared-prefix-branch={req.shared_prefix_branch}: must be between 1 and "
            f"seq_len-1={req.seq_len - 1} (a branch is the part of S after the shared prompt)"
        )
    found, why = layouts(req)
    if not found:
        reasons = "; ".join(why) or "no TP·PP·CP·DP split fits the sizes"
        raise PlanError(
            f"no valid layout of {req.model.name} on {req.gpus} GPUs at S={req.seq_len}, "
            f"global batch {req.global_batch}: {reasons} (sequence must divide into 2·CP "
            "chunks, ×TP with sequence parallelism; global batch into micro_batch·DP)"
        )
    budget = HEADROOM * req.gpu_mem_gib * GIB
    rows = [PlanRow(lay, mem, mem.total <= budget) for lay in found for mem in [estimate(req, lay)]]
    fitting = [r for r in rows if r.fits]
    if not fitting:
        best = min(rows, key=lambda r: r.memory.total)
        hint = "add GPUs or use a shorter sequence"
        if req.recompute != "full":
            hint = "use recompute full, add GPUs or use a shorter sequence"
        raise PlanError(
            f"{req.model.name} at S={req.seq_len} does not fit {req.gpus} GPUs of "
            f"{req.gpu_mem_gib:g} GiB: the smallest layout ({best.layout}) needs "
            f"{best.memory.total / GIB:.1f} GiB per GPU (limit {budget / GIB:.1f} GiB = "
            f"{HEADROOM:.0%}); {hint}"
        )
    # Most data parallelism (least model-parallel communication), then no pipeline bubble,
    # then the smallest TP (its all-reduces sit on the critical path), then the least memory.
    best = min(fitting, key=lambda r: (-r.layout.dp, r.layout.pp, r.layout.tp, r.memory.total))
    return rows, best


def load_model(name: str) -> ModelConfig:
    """A model preset by name (``conf/model/<name>.yaml``) or a YAML path."""
    from longpo_megatron.export.cli import load_model_yaml

    path = Path(name)
    if not path.suffix:
        path = CONF_MODELS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONF_MODELS.glob("*.yaml")))
        raise PlanError(f"--model {name!r}: no such preset or file (presets: {known})")
    return load_model_yaml(str(path))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longpo-plan",
        description="Every TP/PP/CP/DP layout with its per-GPU memory, the step's FLOPs and "
        "time at a given MFU, and a recommended layout.",
    )
    p.add_argument("--model", required=True, help="conf/model preset name or a model YAML")
    p.add_argument("--seq-len", type=int, required=True, help="long sequence length S")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in total")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node")
    p.add_argument("--micro-batch", type=int, default=1, help="pairs per micro-batch")
    p.add_argument("--global-batch", type=int, default=8, help="pairs per step (paper: 8)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="full")
    p.add_argument(
        "--reference", choices=("initial_policy", "precomputed", "online"), default="initial_policy"
    )
    p.add_argument("--ref-seq-len", type=int, default=None, help="short reference length")
    p.add_argument("--engine", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--logits-chunk", type=int, default=1024)
    p.add_argument("--gpu", choices=sorted(flops.PEAK_FLOPS), default="h100", help="peak FLOP/s")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for step time")
    p.add_argument(
        "--shared-prefix-branch",
        type=int,
        default=None,
        help="data.shared_prefix: tokens of each branch after the shared prompt",
    )
    return p


def _report(req: PlanRequest, rows: list[PlanRow], best: PlanRow) -> str:
    cols = ("weights", "grads", "optimizer", "activations", "loss", "reference")
    head = f"{'layout':<22}" + "".join(f"{c[:11]:>12}" for c in cols) + f"{'total GiB':>11}  fits"
    lines = [
        f"{req.model.name}: S={req.seq_len}, {req.gpus} GPUs x {req.gpu_mem_gib:g} GiB, "
        f"recompute={req.recompute}, reference={req.reference}, engine={req.engine}",
        head,
    ]
    for r in rows:
        mark = "  <- recommended" if r is best else ""
        cells = "".join(f"{getattr(r.memory, c) / GIB:>12.2f}" for c in cols)
        lines.append(
            f"{str(r.layout):<22}{cells}{r.memory.total / GIB:>11.2f}  "
            f"{'yes' if r.fits else 'no'}{mark}"
        )
    total = step_flops(req)
    seconds = total / (req.gpus * req.peak_flops * req.mfu)
    lay = best.layout
    lines += [
        f"FLOPs per step: {total:.3e} ({req.global_batch} pairs); step time at MFU "
        f"{req.mfu:.0%}: {seconds:.1f} s ({req.global_batch * req.tokens_per_pair / seconds:,.0f} "
        "tokens/s)",
        f"recommended: {lay} -> parallel.tensor_model_parallel_size={lay.tp} "
        f"parallel.pipeline_model_parallel_size={lay.pp} parallel.context_parallel_size={lay.cp}"
        f" train.micro_batch_size={req.micro_batch} train.global_batch_size={req.global_batch}"
        + (" data.shared_prefix=true model.attention_backend=" if req.packed else "")
        + (("flex" if req.engine == "gpu" else "local") if req.packed else ""),
    ]
    return "\n".join(lines)


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``longpo-plan``: print the layout table and the recommendation."""
    a = _parser().parse_args(argv)
    req = PlanRequest(
        model=load_model(a.model),
        seq_len=a.seq_len,
        gpus=a.gpus,
        gpu_mem_gib=a.gpu_mem,
        micro_batch=a.micro_batch,
        global_batch=a.global_batch,
        recompute=a.recompute,
        reference=a.reference,
        ref_seq_len=a.ref_seq_len,
        engine=a.engine,
        distributed_optimizer=not a.no_distributed_optimizer,
        logits_chunk=a.logits_chunk,
        gpus_per_node=a.gpus_per_node,
        mfu=a.mfu,
        peak_flops=flops.PEAK_FLOPS[a.gpu],
        shared_prefix_branch=a.shared_prefix_branch,
    )
    rows, best = plan(req)
    print(_report(req, rows, best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
