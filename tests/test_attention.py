"""Project attention pieces against plain PyTorch: blockwise kernel, masks, CP split, RoPE slice."""

from __future__ import annotations

import math

import pytest
import torch

from longpo_megatron.context_parallel import local_token_index, split_batch
from longpo_megatron.model.attention_mask import AttentionMask
from longpo_megatron.model.blockwise_attention import blockwise_attention


def _plain_attention(q, k, v, allowed, scale):
    """softmax(q kᵀ + mask) v written out, GQA by repeating k/v heads."""
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1)
    return p @ v.repeat_interleave(g, 1)


def _qkv(b=2, h=4, hk=2, s=37, d=8):
    torch.manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(b, h, s, d), mk(b, hk, s, d), mk(b, hk, s, d)


@pytest.mark.parametrize("kind", ["causal", "segments", "branches"])
@pytest.mark.parametrize("blocks", [(5, 7), (64, 64), (1, 3)])
def test_blockwise_matches_plain_softmax(kind, blocks):
    q, k, v = _qkv()
    b, s = q.shape[0], q.shape[2]
    mask = AttentionMask.causal(b, s)
    if kind != "causal":
        mask.segment = torch.randint(0, 3, (b, s)).sort(-1).values
    if kind == "branches":
        mask.branch = torch.randint(0, 3, (b, s))
    out = blockwise_attention(q, k, v, mask, 0.3, *blocks)
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    ref = _plain_attention(q, k, v, mask.allowed(torch.arange(s), torch.arange(s)), 0.3)
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)


def test_branches_do_not_see_each_other():
    """Chosen (branch 1) and rejected (branch 2) both see the trunk, never each other."""
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    mask = AttentionMask(order=torch.arange(7)[None], branch=branch)
    allowed = mask.allowed(torch.arange(7), torch.arange(7))[0, 0]
    assert allowed[5, :3].all() and not allowed[5, 3:5].any() and allowed[5, 5]
    assert allowed[4, :5].all() and not allowed[4, 5:].any()


def test_local_token_index_is_megatrons_load_balanced_layout():
    assert local_token_index(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert local_token_index(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert local_token_index(16, 3, 4).tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="not divisible by 2\\*context_parallel_size=4"):
        local_token_index(10, 0, 2)


def test_split_batch_splits_sequence_keys_only():
    batch = {
        "tokens": torch.arange(16).view(2, 8),
        "labels": torch.arange(16).view(2, 8) + 100,
        "ref_logps": torch.tensor([1.0, 2.0]),
    }
    part = split_batch(batch, 1, 2)
    assert part["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert part["labels"][0].tolist() == [102, 103, 104, 105]
    assert torch.equal(part["ref_logps"], batch["ref_logps"])
    assert part["attention_mask"].query_index.tolist() == [2, 3, 4, 5]


def test_blockwise_with_query_subset_equals_rows_of_full_attention():
    """What a CP rank computes: its queries against all keys, in global causal order."""
    q, k, v = _qkv(s=16)
    index = local_token_index(16, 1, 4)
    mask = AttentionMask.causal(2, 16).with_queries(index)
    out = blockwise_attention(q[:, :, index], k, v, mask, 0.5, 3, 5)
    full = _plain_attention(
        q, k, v, AttentionMask.causal(2, 16).allowed(torch.arange(16), torch.arange(16)), 0.5
    )
    torch.testing.assert_close(out, full[:, :, index], rtol=1e-12, atol=1e-12)


class _Group:
    """Stand-in exposing the two ProcessGroup methods RoPE's CP slice reads."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_rope_cp_slice_matches_full_table(single_rank_group):
    from longpo_megatron.model.rope import DeviceAgnosticRotaryEmbedding

    rope = DeviceAgnosticRotaryEmbedding(
        kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True, cp_group=single_rank_group
    )
    full = rope(32)
    assert full.shape == (32, 1, 1, 16)
    freqs = torch.outer(torch.arange(32.0), 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
    torch.testing.assert_close(full[:, 0, 0], torch.cat([freqs, freqs], -1))
    part = rope(32, cp_group=_Group(1, 2))
    torch.testing.assert_close(
        part, full[[8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]]
    )


def test_te_layout_passes_cp_comm_type_and_local_gets_none():
    from longpo_megatron.config import ModelConfig
    from longpo_megatron.model.gpt import ModelLayout, transformer_config

    te = transformer_config(ModelConfig(), ModelLayout(1, 1, 2, False, "te", "gpu", "bf16", "a2a"))
    assert te.cp_comm_type == "a2a" and te.context_parallel_size == 2
    local = transformer_config(ModelConfig(), ModelLayout(1, 1, 2, False, "local", "cpu", "fp32"))
    assert local.cp_comm_type is None


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_path_matches_plain_softmax(masked):
    """LocalCoreAttention without CP or branches (the SDPA path, GQA) equals plain softmax
    attention with repeated K/V heads, forward and backward, causal or under megatron's
    boolean mask (True = masked out)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from longpo_megatron.model.attention import LocalCoreAttention

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    attn = LocalCoreAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(d=8)  # [b, h, s, d]
    b, s = q.shape[0], q.shape[2]
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)
    if masked:
        keep = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(1)) > 0.3
        allowed = allowed & keep
        allowed = allowed | torch.eye(s, dtype=torch.bool)  # every query sees a key
    mask = ~allowed if masked else None
    out = attn(*(t.permute(2, 0, 1, 3) for t in (q, k, v)), mask)  # megatron's [s, b, h, d]
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    ref = _plain_attention(q, k, v, allowed, 8**-0.5).permute(2, 0, 1, 3).reshape(s, b, -1)
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
