"""Model FLOPs of a LongPO step, counted from the layout that actually runs.

The formula (multiply-adds count 2 FLOPs; model FLOPs, so activation recompute is NOT counted):

* per token and layer, the linear layers:
  ``2·h·(n_q·d + 2·n_kv·d)`` (QKV) + ``2·n_q·d·h`` (output projection) + ``3·2·h·f`` (SwiGLU);
* per attended (query, key) pair and layer: ``4·n_q·d`` (``QKᵀ`` and ``A·V``). A causal sequence of
  ``s`` tokens has ``s(s+1)/2`` pairs; a shared-prefix pack has the prefix's causal pairs plus, per
  branch of ``b`` tokens, ``b·prefix + b(b+1)/2``;
* per position whose log-prob is taken: ``2·h·V`` (the output layer runs only there);
* training = 3 × forward (backward costs two forwards); the frozen reference's forward (online
  mode, or scoring) counts once.

MFU = model FLOPs per second per GPU ÷ the GPU's dense peak (:data:`PEAK_FLOPS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from longpo_megatron.config import ModelConfig

PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
    "a800": 312e12,
    "b200": 2250e12,
}
"""Dense bf16 tensor-core peak FLOP/s per GPU (vendor data sheets, no sparsity)."""


@dataclass(frozen=True)
class Dims:
    """The sizes the FLOP formula needs, taken from a :class:`ModelConfig`."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model: ModelConfig) -> Dims:
        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        return cls(
            layers=model.num_layers,
            hidden=model.hidden_size,
            ffn=model.ffn_hidden_size,
            heads=model.num_attention_heads,
            kv_heads=model.num_query_groups,
            head_dim=head_dim,
            vocab=model.vocab_size,
        )

    @property
    def linear_per_token(self) -> int:
        """FLOPs of one token through every layer's linear layers."""
        h, d = self.hidden, self.head_dim
        qkv = 2 * h * (self.heads * d + 2 * self.kv_heads * d)
        out = 2 * self.heads * d * h
        mlp = 3 * 2 * h * self.ffn
        return self.layers * (qkv + out + mlp)

    @property
    def attention_per_pair(self) -> int:
        """FLOPs of one attended (query, key) pair through every layer."""
        return self.layers * 4 * self.heads * self.head_dim


def causal_pairs(seq_len: int) -> int:
    """Attended pairs of a causal sequence."""
    return seq_len * (seq_len + 1) // 2


def shared_prefix_pairs(prefix: int, branches: Iterable[int]) -> int:
    """Attended pairs of [prefix | branch_1 | branch_2 …], each branch seeing only the prefix."""
    return causal_pairs(prefix) + sum(b * prefix + causal_pairs(b) for b in branches)


def forward_flops(dims: Dims, tokens: int, pairs: int, logit_positions: int) -> float:
    """FLOPs of one forward over ``tokens`` tokens with ``pairs`` attended pairs."""
    return float(
        dims.linear_per_token * tokens
        + dims.attention_per_pair * pairs
        + 2 * dims.hidden * dims.vocab * logit_positions
    )


def sequences_forward_flops(dims: Dims, lengths: Iterable[int], logit_positions: int) -> float:
    """FLOPs of one forward over independent causal sequences of the given lengths."""
    lengths = list(lengths)
    pairs = sum(causal_pairs(s) for s in lengths)
    return forward_flops(dims, sum(lengths), pairs, logit_positions)


def step_flops(policy_forward: float, reference_forward: float = 0.0) -> float:
    """Model FLOPs of a training step: 3× the policy forward plus the reference forward."""
    return 3.0 * policy_forward + reference_forward


def peak_flops_of(device_name: str) -> Optional[float]:
    """The :data:`PEAK_FLOPS` entry whose key appears in ``device_name`` (e.g. "NVIDIA H100 80GB
    HBM3"), or None when the device is not listed."""
    name = device_name.lower()
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def mfu(flops: float, seconds: float, num_gpus: int, peak_flops: float) -> float:
    """Model FLOPs utilisation of ``flops`` done in ``seconds`` on ``num_gpus`` GPUs."""
    if seconds <= 0 or num_gpus <= 0 or peak_flops <= 0:
        return 0.0
    return flops / seconds / num_gpus / peak_flops
