"""FlexAttention (``model.attention_backend=flex``) and the mask-free packed CPU path against
plain dense masked softmax attention written out in PyTorch (independent of the code under test).

Layouts: plain causal rows, and packed shared-prefix rows of 1-turn and 3-turn records (real
collation of the toy data, padded), fp32, GQA, forward and backward to 1e-5 relative. The block
classification behind the ``BlockMask`` is checked against the dense mask (every block holding an
allowed pair is kept, every block marked full is wholly allowed, cross-branch blocks are skipped),
and once through the compiled (block-sparse) CPU kernel (slow tier).
"""

from __future__ import annotations

import math

import pytest
import torch
from parity_common import rel_err
from test_shared_prefix import _dataset, synthetic_packed_mask, turn_data  # noqa: F401

from longpo_megatron.context_parallel import local_token_index, packed_attention_mask
from longpo_megatron.model.attention_mask import AttentionMask
from longpo_megatron.model.flex_attention import (
    _ordered,
    block_classes,
    flex_attend,
    flex_block_mask,
)

HEADS, GROUPS, DIM = 4, 2, 16


def _plain(q, k, v, allowed, scale):
    """softmax(q kᵀ + mask) v written out ([b, h, s, d]; GQA by repeating k/v heads)."""
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * scale
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v.repeat_interleave(g, 1)


def _layout(kind: str, path: str) -> AttentionMask:
    """causal: 2 rows of 200; packed_1turn / packed_3turn: two toy pairs packed and padded."""
    if kind == "causal":
        return AttentionMask.causal(2, 200)
    from longpo_megatron.data.collate import collate_shared_prefix

    dataset = _dataset(path)
    picks = (0, 2) if kind == "packed_1turn" else (1, 3)  # even records: 1 turn, odd: 3 turns
    batch = collate_shared_prefix([dataset[i] for i in picks], 256, 64)
    assert (batch["branch"] == 2).sum(1).gt(0).all()  # padding present, joined to branch 2
    return packed_attention_mask(batch)


def _qkv(rows: int, seq: int, device: str = "cpu"):
    gen = torch.Generator(device=device).manual_seed(0)

    def mk(h):  # [s, b, h, d], megatron's layout
        return torch.randn(seq, rows, h, DIM, device=device, generator=gen).requires_grad_()

    return mk(HEADS), mk(GROUPS), mk(GROUPS)


def _check_module(
    attn, mask: AttentionMask, pass_mask=None, device: str = "cpu", tol: float = 1e-5
) -> None:
    """``attn`` (megatron layout) vs the plain reference: output (1e-5) and dq, dk, dv (tol)."""
    rows, seq = mask.order.shape
    q, k, v = _qkv(rows, seq, device)
    grad = torch.randn(seq, rows, HEADS * DIM, device=device, generator=torch.Generator(device))
    out = attn(q, k, v, mask if pass_mask is None else pass_mask)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    idx = torch.arange(seq, device=device)
    ref = _plain(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), mask.allowed(idx, idx), DIM**-0.5)
    ref = ref.permute(2, 0, 1, 3).reshape(seq, rows, HEADS * DIM)
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    assert rel_err(out.detach(), ref.detach()) <= 1e-5
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= tol, f"d{name}: relative error {rel_err(a, b):.2e}"


def _core(cls):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return cls(cfg, 1, AttnMaskType.causal, "self")


@pytest.mark.parametrize("kind", ["causal", "packed_1turn", "packed_3turn"])
def test_flex_core_attention_matches_plain_attention(kind, turn_data):  # noqa: F811
    from longpo_megatron.model.attention import FlexCoreAttention

    mask = _layout(kind, turn_data)
    _check_module(_core(FlexCoreAttention), mask)
    if kind == "causal":  # megatron's causal contract: no mask object at all
        _check_module(_core(FlexCoreAttention), mask, pass_mask=None)


@pytest.mark.parametrize("kind", ["packed_1turn", "packed_3turn"])
def test_packed_rows_without_mask_tensor_match_plain_attention(kind, turn_data):  # noqa: F811
    """The local backend's no-CP packed path (prompt / branch parts merged by log-sum-exp)."""
    from longpo_megatron.model.attention import LocalCoreAttention

    _check_module(_core(LocalCoreAttention), _layout(kind, turn_data))


def test_packed_path_saves_no_mask_and_no_expanded_kv(turn_data):  # noqa: F811
    """What autograd keeps from the packed path: nothing of [branch × S] and no K/V copy
    with the query heads (the old path saved both)."""
    from longpo_megatron.model.attention import LocalCoreAttention

    mask = _layout("packed_3turn", turn_data)
    rows, seq = mask.order.shape
    q, k, v = _qkv(rows, seq)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _core(LocalCoreAttention)(q, k, v, mask)
    assert saved and all(t.dtype != torch.bool for t in saved)
    kv_bytes = k.untyped_storage().nbytes()
    big = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    # beyond q/k/v themselves: outputs and per-query log-sum-exps only (< one q per row)
    extra = sum(n for p, n in big.items() if p not in inputs)
    assert extra <= 2 * q.untyped_storage().nbytes() + kv_bytes // 2


def test_packed_path_output_is_the_tensor_the_next_linear_saves(turn_data):  # noqa: F811
    """The attention output is held once per layer: the tensor the packed path saves for its
    backward is the one it returns, which ``linear_proj`` saves as its input."""
    from longpo_megatron.model.attention import LocalCoreAttention

    mask = _layout("packed_3turn", turn_data)
    rows, seq = mask.order.shape
    q, k, v = _qkv(rows, seq)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _core(LocalCoreAttention)(q, k, v, mask)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert out.untyped_storage().data_ptr() in ptrs
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    out_sized = [p for p, n in sizes.items() if n >= out.untyped_storage().nbytes()]
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    assert [p for p in out_sized if p not in inputs] == [out.untyped_storage().data_ptr()]


def test_packed_path_refuses_other_layouts():
    from longpo_megatron.model.attention import LocalCoreAttention

    order = torch.tensor([[0, 1, 2, 3, 2, 3, 4, 5]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1]])  # branch 1 split in two runs
    q, k, v = _qkv(1, 8)
    with pytest.raises(ValueError, match="one contiguous run"):
        _core(LocalCoreAttention)(q, k, v, AttentionMask(order=order, branch=branch))


def test_flex_cp_local_queries_equal_rows_of_full_attention(turn_data):  # noqa: F811
    """What a CP rank computes: its load-balanced queries against all keys (packed mask)."""
    mask = _layout("packed_3turn", turn_data)
    rows, seq = mask.order.shape
    q, k, v = (x.permute(1, 2, 0, 3) for x in _qkv(rows, seq))
    index = local_token_index(seq, 1, 2)
    out = flex_attend(q[:, :, index], k, v, mask.with_queries(index), 0.25, block=32)
    idx = torch.arange(seq)
    full = _plain(q, k, v, mask.allowed(idx, idx), 0.25)[:, :, index]
    grad = torch.randn_like(out)
    got = torch.autograd.grad((out * grad).sum(), (k, v))
    want = torch.autograd.grad((full * grad).sum(), (k, v))
    assert rel_err(out.detach(), full.detach()) <= 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def _dense_blocks(mask: AttentionMask, q_len: int, block: int):
    """(any allowed, all allowed) per block pair, from the dense mask (ragged tails cropped)."""
    idx = torch.arange(q_len)
    allowed = mask.allowed(mask.query_global(idx), torch.arange(mask.order.shape[1]))[:, 0]
    pad_q, pad_k = -allowed.shape[1] % block, -allowed.shape[2] % block
    padded = torch.nn.functional.pad(allowed, (0, pad_k, 0, pad_q))
    b, nq, nk = padded.shape[0], padded.shape[1] // block, padded.shape[2] // block
    tiles = padded.view(b, nq, block, nk, block).transpose(2, 3).flatten(3)
    return tiles.any(-1), tiles.all(-1)


@pytest.mark.parametrize("kind", ["causal", "packed_1turn", "packed_3turn", "cp_rank"])
@pytest.mark.parametrize("block", [16, 64])
def test_block_classes_keep_every_allowed_pair(kind, block, turn_data):  # noqa: F811
    mask = _layout("packed_3turn" if kind == "cp_rank" else kind, turn_data)
    seq = mask.order.shape[1]
    q_len = seq
    if kind == "cp_rank":
        mask, q_len = mask.with_queries(local_token_index(seq, 0, 2)), seq // 2
    empty, full = block_classes(mask, q_len, seq, block)
    some, every = _dense_blocks(mask, q_len, block)
    assert not (empty & some).any(), "a block with an allowed pair was skipped"
    assert not (full & ~every[..., : full.shape[2]]).any(), "a block marked full is masked"
    assert not (empty & full).any()
    if kind.startswith("packed"):  # cross-branch: rejected-only queries vs chosen-only keys
        q_rej, k_cho = (_block_branch(mask.branch, block, v) for v in (2, 1))
        assert (q_rej[:, :, None] & k_cho[:, None, :]).any()
        assert empty[q_rej[:, :, None] & k_cho[:, None, :]].all()
    assert empty.sum() >= (~some).sum() * (0.5 if kind != "cp_rank" else 0.3)


def _block_branch(branch: torch.Tensor, block: int, value: int) -> torch.Tensor:
    """[b, n_blocks]: every token of the block is in ``value``."""
    pad = -branch.shape[1] % block
    x = torch.nn.functional.pad(branch, (0, pad), value=-1).view(branch.shape[0], -1, block)
    return ((x == value) | (x == -1)).all(-1) & (x == value).any(-1)


@pytest.mark.slow
def test_compiled_cpu_kernel_uses_the_block_mask():
    """torch.compile(flex_attention) on CPU runs the block-sparse kernel (forward only: torch
    has no CPU flex backward): it equals plain attention, and the same BlockMask with its
    partial blocks dropped does not, so the kernel really reads the block classification."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    seq, prompt, chosen = 512, 300, 90
    order, branch = torch.zeros(1, seq, dtype=torch.int64), torch.full((1, seq), 2)
    branch[0, :prompt], branch[0, prompt : prompt + chosen] = 0, 1
    order[0, : prompt + chosen] = torch.arange(prompt + chosen)
    order[0, prompt + chosen :] = torch.arange(prompt, seq - chosen)
    mask = AttentionMask(order=order, branch=branch)
    q, k, v = (x.detach().permute(1, 2, 0, 3) for x in _qkv(1, seq))
    kernel = torch.compile(flex_attention)
    block_mask = flex_block_mask(mask, seq, seq)
    got = kernel(q, k, v, block_mask=block_mask, scale=0.25, enable_gqa=True)
    idx = torch.arange(seq)
    assert rel_err(got, _plain(q, k, v, mask.allowed(idx, idx), 0.25)) <= 1e-5
    _, full = block_classes(mask, seq, seq)
    no_partial = _ordered(torch.zeros_like(full))
    full_only = BlockMask.from_kv_blocks(
        *no_partial, *_ordered(full), BLOCK_SIZE=128, mask_mod=block_mask.mask_mod
    )
    wrong = kernel(q, k, v, block_mask=full_only, scale=0.25, enable_gqa=True)
    assert rel_err(wrong, got) > 1e-2


def check_flex_attention(
    device: str, seq: int, prefixes: tuple[int, ...], branch: int, tol: float = 1e-5
) -> None:
    """FlexCoreAttention on packed rows (no CP) vs plain attention, fwd + bwd, on ``device``
    (the GPU tier runs it on CUDA, where flex_attention is compiled)."""
    from longpo_megatron.model.attention import FlexCoreAttention

    mask = synthetic_packed_mask(seq, prefixes, branch).to(device)
    _check_module(_core(FlexCoreAttention).to(device), mask, device=device, tol=tol)


def test_check_flex_attention_on_cpu():
    """The GPU tier's check (tests/test_gpu.py), small, on CPU."""
    check_flex_attention("cpu", 320, (200, 90), 60)


def _resolved(cuda: bool, triton: bool, monkeypatch, **keys) -> str:
    from longpo_megatron import config_validation
    from longpo_megatron.config import Config

    monkeypatch.setattr(config_validation, "triton_available", lambda: triton)
    monkeypatch.setattr(config_validation, "te_available", lambda: True)
    cfg = Config()
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return config_validation.validate_config(cfg, 1, cuda).attention_backend


def test_config_resolves_flex(monkeypatch):
    """flex is a validated choice; packed rows pick it on the gpu engine under auto."""
    from longpo_megatron.config_validation import ConfigError

    assert _resolved(False, False, monkeypatch, model__attention_backend="flex") == "flex"
    assert _resolved(True, True, monkeypatch, model__attention_backend="flex") == "flex"
    assert _resolved(True, True, monkeypatch, data__shared_prefix=True) == "flex"
    assert _resolved(False, False, monkeypatch, data__shared_prefix=True) == "local"
    assert _resolved(True, True, monkeypatch) == "te"  # plain rows: TE stays the gpu default
    with pytest.raises(ConfigError, match="'flex' runs FlexAttention on the gpu engine but triton"):
        _resolved(True, False, monkeypatch, model__attention_backend="flex")
    with pytest.raises(ConfigError, match="shared_prefix=true with .*'local' runs FlexAttention"):
        _resolved(
            True, False, monkeypatch, data__shared_prefix=True, model__attention_backend="local"
        )
    assert (
        _resolved(
            True, True, monkeypatch, data__shared_prefix=True, model__attention_backend="local"
        )
        == "local"
    )
    with pytest.raises(ConfigError, match="model.attention_backend='bogus'.*'flex'"):
        _resolved(False, False, monkeypatch, model__attention_backend="bogus")


def test_flex_layer_spec_uses_flex_core_attention():
    from longpo_megatron.model.attention import FlexCoreAttention, RecomputedFlexCoreAttention
    from longpo_megatron.model.spec import layer_spec

    def core(recompute):
        return layer_spec("flex", recompute).submodules.self_attention.submodules.core_attention

    assert core("none") is FlexCoreAttention
    assert core("selective") is RecomputedFlexCoreAttention


def test_mask_layouts_are_built_once_per_micro_batch(monkeypatch, turn_data):  # noqa: F811
    """Every layer gets the same mask: the branch runs (local) and the BlockMask (flex) are
    derived once from it, not once per layer; a CP copy of the mask derives its own."""
    from longpo_megatron.model import branch_attention, flex_attention
    from longpo_megatron.model.attention import FlexCoreAttention, LocalCoreAttention

    calls = {"runs": 0, "blocks": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        branch_attention, "branch_runs", counted("runs", branch_attention.branch_runs)
    )
    monkeypatch.setattr(
        flex_attention, "block_classes", counted("blocks", flex_attention.block_classes)
    )
    mask = _layout("packed_3turn", turn_data)
    rows, seq = mask.order.shape
    q, k, v = _qkv(rows, seq)
    layers = [_core(LocalCoreAttention), _core(LocalCoreAttention)]
    first, second = (layer(q, k, v, mask) for layer in layers)
    assert calls["runs"] == rows and torch.equal(first, second)
    for layer in (_core(FlexCoreAttention), _core(FlexCoreAttention)):
        layer(q, k, v, mask)
    assert calls["blocks"] == 1
    assert mask._derived and not mask.with_queries(torch.arange(seq))._derived
