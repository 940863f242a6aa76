"""The model-FLOP formula (longpo_megatron/flops.py) against a hand count and against torch's
FLOP counter on the independent plain-PyTorch decoder, and the per-batch statistics built on it."""

from __future__ import annotations

import pytest
import torch
from reference_impl import RefConfig, RefLlama
from torch.utils.flop_counter import FlopCounterMode

from longpo_megatron.config import ModelConfig
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.tokenize import TokenizedPair
from longpo_megatron.flops import (
    Dims,
    causal_pairs,
    forward_flops,
    mfu,
    peak_flops_of,
    sequences_forward_flops,
    step_flops,
)
from longpo_megatron.step_stats import global_batch_stats

TINY = dict(
    num_layers=2,
    hidden_size=8,
    ffn_hidden_size=16,
    num_attention_heads=2,
    num_query_groups=1,
    vocab_size=10,
)


def test_hand_count_one_configuration():
    """2 layers, h=8, f=16, 2 query heads of d=4, 1 KV head, V=10; one causal sequence of 3
    tokens whose last 2 positions are projected to logits; a 2-token reference sequence with 1."""
    dims = Dims.of(ModelConfig(**TINY))
    # per token and layer: QKV 2*8*(2*4 + 2*1*4) = 256, out 2*8*8 = 128, SwiGLU 3*2*8*16 = 768
    linear = 2 * (256 + 128 + 768)  # = 2304 per token, both layers
    # per attended pair and layer: QK^T + AV = 4 * 2 heads * 4 = 32; 3 tokens: 6 causal pairs
    attention = 2 * 32 * 6  # = 384
    logits = 2 * 8 * 10 * 2  # = 320
    policy = 3 * linear + attention + logits
    assert policy == 7616
    assert sequences_forward_flops(dims, [3], 2) == policy
    reference = 2 * linear + 2 * 32 * 3 + 2 * 8 * 10 * 1  # = 4960
    assert sequences_forward_flops(dims, [2], 1) == reference
    assert step_flops(policy, reference) == 3 * 7616 + 4960 == 27808
    assert mfu(27808, 2.0, 4, 1000.0) == 27808 / 2.0 / 4 / 1000.0


@pytest.mark.parametrize("seq", [5, 16])
def test_formula_equals_torch_flop_counter(seq):
    """Without causal savings (all s^2 pairs) and with logits at every position, the formula is
    exactly what torch counts for the plain decoder's matmuls; forward+backward is 3x that."""
    torch.manual_seed(0)
    cfg = RefConfig(kv_channels=None, **TINY)
    model = RefLlama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq))
    dims = Dims.of(ModelConfig(**TINY))
    dense = forward_flops(dims, seq, seq * seq, seq)
    with FlopCounterMode(display=False) as counter:
        logits = model(tokens)
    assert counter.get_total_flops() == dense
    with FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    assert counter.get_total_flops() == step_flops(dense)
    assert causal_pairs(seq) < seq * seq and logits.shape == (1, seq, cfg.vocab_size)


def _pair(index: int, chosen: int, rejected: int, response: int) -> TokenizedPair:
    def mask(n: int) -> list[bool]:
        return [False] * (n - response) + [True] * response

    return TokenizedPair(
        index, [1] * chosen, [1] * rejected, mask(chosen), mask(rejected),
        ref_chosen=[([1] * 4, [False, False, True, True])],
        ref_rejected=[([1] * 3, [False, True, True])],
    )  # fmt: skip


def test_global_batch_stats():
    dataset = PreferenceDataset([_pair(0, 10, 7, 3), _pair(1, 5, 6, 2)])
    dims = Dims.of(ModelConfig(**TINY))
    stats = global_batch_stats(
        dataset, [0, 1], dims, dp_size=2, micro_batch_size=1, seq_multiple=4,
        nll_scope="full", reference_view="short",
    )  # fmt: skip
    assert stats.tokens == 10 + 7 + 5 + 6 and stats.rows == 4
    assert stats.padded_tokens == 2 * 12 + 2 * 8  # DP rank 0: pair 0 (pad 10 -> 12), 1: 6 -> 8
    assert (stats.min_len, stats.max_len) == (5, 10)
    # nll_scope=full: every real label of the chosen row (len - 1) + the rejected responses
    logits = (10 - 1) + 3 + (5 - 1) + 2
    assert stats.policy_forward_flops == sequences_forward_flops(dims, [10, 5, 7, 6], logits)
    reference = sequences_forward_flops(dims, [4, 3, 4, 3], 2 + 2 + 2 + 2)
    assert stats.reference_forward_flops == reference
    m = stats.metrics()
    assert m["padding_fraction"] == pytest.approx(1 - 28 / 40) and m["seq_len/mean"] == 7.0
    responses = global_batch_stats(
        dataset, [0, 1], dims, dp_size=1, micro_batch_size=2, seq_multiple=1,
        nll_scope="responses",
    )  # fmt: skip
    assert responses.padded_tokens == 4 * 10 and responses.reference_forward_flops == 0.0
    assert responses.policy_forward_flops == sequences_forward_flops(dims, [10, 5, 7, 6], 10)


def test_peak_flops_of():
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA A800-SXM4-80GB") == 312e12
    assert peak_flops_of("cpu") is None
