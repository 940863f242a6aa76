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

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from longpo_megatron import flops
from longpo_megatron.config import ModelConfig
from longpo_megatron.errors import UserError

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
    seq_len: int
    """Padded length of each long (chosen / rejected) sequence."""
    gpus: int
    gpu_mem_gib: float
    micro_batch: int = 1
    """Pairs per micro-batch (2 rows: chosen and rejected)."""
    global_batch: int = 8
    """Pairs per optimizer step."""
    recompute: str = "full"
    reference: str = "initial_policy"
    """initial_policy | precomputed (no reference weights while training) | online."""
    ref_seq_len: Optional[int] = None
    """Short reference sequence length (online reference, FLOPs); null = min(S, 32768)."""
    engine: str = "gpu"
    """gpu (bf16, megatron DDP + distributed optimizer, TE attention) | cpu (fp32, local)."""
    distributed_optimizer: bool = True
    logits_chunk: int = 1024
    gpus_per_node: int = 8
    """TP stays inside a node."""
    mfu: float = 0.4
    peak_flops: float = flops.PEAK_FLOPS["h100"]


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
        return (
            self.weights + self.grads + self.optimizer + self.activations + self.loss
        ) + self.reference


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
    * core attention: the local backend keeps q and k, v expanded to the query heads plus a
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
    elif backend == "te":
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
    backend = "te" if req.engine == "gpu" else "local"
    dtype = 2 if req.engine == "gpu" else 4
    tokens = 2 * req.micro_batch * req.seq_len / lay.cp
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
