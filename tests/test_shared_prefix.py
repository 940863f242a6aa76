"""Shared-prefix packing (``data.shared_prefix``) equals the two-sequence layout.

Unit tests check the packed collation (one copy of the prompt, positions continuing from it,
labels never crossing a branch) and the attention mask. The parity tests train 3 steps with
packed pairs at CP=1, CP=2, TP=2×CP=2 and PP=2 and compare reference scores, loss, every metric,
grad-norm, step-1 gradients and final weights (fp32, 1e-5 relative) with the independent
reference implementation run on the TWO-sequence layout (tests/reference_impl.py), on records
of 1 and 3 turns; with the local attention and with FlexAttention (all four layouts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from parity_common import assert_matches_reference, parity_worker

LAYOUTS = {  # name: (tp, pp, cp, slow, model.attention_backend)
    "cp1": (1, 1, 1, False, "auto"),
    "cp2": (1, 1, 2, True, "auto"),
    "tp2_cp2": (2, 1, 2, True, "auto"),
    "pp2": (1, 2, 1, False, "auto"),
    "flex_cp1": (1, 1, 1, False, "flex"),
    "flex_cp2": (1, 1, 2, True, "flex"),
    "flex_tp2_cp2": (2, 1, 2, True, "flex"),
    "flex_pp2": (1, 2, 1, True, "flex"),
}


@pytest.fixture(scope="module")
def turn_data(tmp_path_factory) -> str:
    """Toy records cut to 1 turn and grown to 3 turns (the toy file holds 2-turn records)."""
    src = Path(__file__).resolve().parent.parent / "data/toy/preference.jsonl"
    records = [json.loads(ln) for ln in src.read_text().splitlines() if ln.strip()][:8]
    for i, rec in enumerate(records):
        turns = rec["turns"]
        rec["turns"] = turns[:1] if i % 2 == 0 else turns + turns[:1]
        if i % 2:  # keep 3 turns within data.max_seq_length
            rec["document"] = rec["document"][: len(rec["document"]) // 2]
    path = tmp_path_factory.mktemp("shared") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _dataset(path: str):
    from longpo_megatron.config import DataConfig
    from longpo_megatron.data.dataset import load_dataset
    from longpo_megatron.data.tokenizer import build_tokenizer

    return load_dataset(DataConfig(path=path), build_tokenizer("byte"))[0]


def test_packed_rows_hold_one_prompt(turn_data):
    from longpo_megatron.data.collate import collate_pairs, collate_shared_prefix

    dataset = _dataset(turn_data)
    pairs = [dataset[i] for i in range(4)]
    two = collate_pairs(pairs, 256, 8)
    packed = collate_shared_prefix(pairs, 256, 8)
    assert packed["tokens"].shape[0] == 4 and packed["tokens"].shape[1] % 8 == 0
    for b, pair in enumerate(pairs):
        br, pos = packed["branch"][b], packed["position_ids"][b]
        k = int((br == 0).sum())
        assert k > 0 and pair.chosen[:k] == pair.rejected[:k]
        assert not any(pair.chosen_response_mask[: k + 1])  # the prompt ends before a response
        for side, row, ids in ((1, b, pair.chosen), (2, b + 4, pair.rejected)):
            sel = (br == 0) | (br == side)
            n = len(ids)
            assert packed["tokens"][b][sel][:n].tolist() == ids
            assert pos[sel][:n].tolist() == list(range(n))
            for key in ("labels", "response_mask", "real_mask"):
                want = two[key][row, : n - 1]
                assert torch.equal(packed[key][b][sel][: n - 1], want), (b, side, key)
            assert packed["real_mask"][b][sel][n - 1] == 0  # no label across a branch


def test_mask_keeps_branches_apart():
    from longpo_megatron.model.attention_mask import AttentionMask

    order = torch.tensor([[0, 1, 2, 3, 2, 3]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 2]])
    mask = AttentionMask(order=order, branch=branch)
    allowed = mask.allowed(torch.arange(6), torch.arange(6))[0, 0]
    assert allowed[4].tolist() == [True, True, False, False, True, False]
    assert allowed[3].tolist() == [True, True, True, True, False, False]
    assert mask.block_is_empty(torch.tensor([4, 5]), torch.tensor([2, 3]))
    assert mask.block_is_empty(torch.tensor([2, 3]), torch.tensor([4, 5]))
    assert not mask.block_is_empty(torch.tensor([4, 5]), torch.tensor([0, 1]))


def test_te_attention_refused():
    from longpo_megatron.config import Config
    from longpo_megatron.config_validation import ConfigError, validate_config

    cfg = Config()
    cfg.data.shared_prefix = True
    cfg.model.attention_backend = "te"
    with pytest.raises(ConfigError, match="data.shared_prefix=true.*attention_backend=flex"):
        validate_config(cfg, world_size=1, cuda_available=False)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if v[3] else []) for n, v in LAYOUTS.items()],
)
def test_shared_prefix_parity(name, turn_data, tmp_path):
    tp, pp, cp, _, backend = LAYOUTS[name]
    results = run_distributed(
        parity_worker,
        tp * pp * cp,
        timeout_s=480,
        tp=tp,
        pp=pp,
        cp=cp,
        data_path=turn_data,
        out_dir=str(tmp_path),
        shared_prefix=True,
        attention_backend=backend,
    )
    logged = assert_matches_reference(results, _dataset(turn_data), f"shared {name}")
    print(f"shared {name}: loss {logged['history'][-1]['loss']:.6f}")


def synthetic_packed_mask(seq: int, prefixes: tuple[int, ...], branch: int):
    """Packed rows of ``seq`` tokens: row r is a shared prompt of ``prefixes[r]`` tokens, a
    chosen branch of ``branch`` tokens, then the rejected branch (to the end of the row)."""
    from longpo_megatron.model.attention_mask import AttentionMask

    rows = len(prefixes)
    order = torch.zeros(rows, seq, dtype=torch.int64)
    br = torch.full((rows, seq), 2, dtype=torch.int64)
    for r, k in enumerate(prefixes):
        br[r, :k], br[r, k : k + branch] = 0, 1
        order[r, : k + branch] = torch.arange(k + branch)
        order[r, k + branch :] = torch.arange(k, k + seq - k - branch)
    return AttentionMask(order=order, branch=br)


def check_packed_attention(device: str, seq: int, prefixes: tuple[int, ...], branch: int) -> None:
    """LocalCoreAttention on packed rows (no CP) vs the blockwise kernel, GQA, fwd + bwd."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from parity_common import rel_err

    from longpo_megatron.model.attention import LocalCoreAttention
    from longpo_megatron.model.blockwise_attention import blockwise_attention

    heads, groups, dim = 4, 2, 16
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    attn = LocalCoreAttention(cfg, 1, AttnMaskType.causal, "self").to(device)
    rows = len(prefixes)
    mask = synthetic_packed_mask(seq, prefixes, branch).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def mk(h):  # [s, b, h, d], megatron's layout
        return torch.randn(seq, rows, h, dim, device=device, generator=gen).requires_grad_()

    q, k, v = mk(heads), mk(groups), mk(groups)
    grad = torch.randn(seq, rows, heads * dim, device=device, generator=gen)
    out = attn(q, k, v, mask)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    ref = blockwise_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), mask, dim**-0.5, 64, 64)
    ref = ref.permute(2, 0, 1, 3).reshape(seq, rows, heads * dim)
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    assert rel_err(out.detach(), ref.detach()) <= 1e-5
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= 1e-5, f"d{name}: relative error {rel_err(a, b):.2e}"


def test_packed_attention_matches_blockwise_kernel():
    check_packed_attention("cpu", 256, (100, 37), 50)


def test_packed_flops_count_the_prompt_once(turn_data):
    """The MFU counter under data.shared_prefix: linear FLOPs of k + c + r tokens and the
    attended pairs of the packed mask, counted by brute force over the mask itself."""
    from longpo_megatron.context_parallel import packed_attention_mask
    from longpo_megatron.data.collate import collate_shared_prefix
    from longpo_megatron.flops import Dims, forward_flops
    from longpo_megatron.step_stats import packed_forward_flops

    dims = Dims(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=160, vocab=264)
    pair = _dataset(turn_data)[1]
    batch = collate_shared_prefix([pair], 256)
    real = len(pair.chosen) + len(pair.rejected) - int((batch["branch"][0] == 0).sum())
    idx = torch.arange(real)
    attended = int(packed_attention_mask(batch).allowed(idx, idx).sum())
    assert packed_forward_flops(dims, [pair], 7) == forward_flops(dims, real, attended, 7)


def test_plan_knows_the_packed_layout():
    """longpo-plan with --shared-prefix-branch: fewer FLOPs and activations than two
    sequences, TE attention not assumed, and a bad branch length is one clear error."""
    from dataclasses import replace

    from longpo_megatron import flops
    from longpo_megatron.plan import (
        PlanError,
        PlanRequest,
        estimate,
        layouts,
        load_model,
        plan,
        step_flops,
    )

    two = PlanRequest(load_model("qwen2_5_7b"), seq_len=131072, gpus=8, gpu_mem_gib=141)
    packed = replace(two, shared_prefix_branch=1024, reference="precomputed")
    two = replace(two, reference="precomputed")
    dims = flops.Dims.of(two.model)
    prompt_pairs = flops.shared_prefix_pairs(131072 - 1024, [1024, 1024])
    want = flops.forward_flops(dims, 8 * (131072 + 1024), 8 * prompt_pairs, 16 * 131072)
    ref = flops.sequences_forward_flops(dims, [32768] * 16, 16 * 32768)
    assert step_flops(packed) == pytest.approx(flops.step_flops(want, ref), rel=1e-12)
    assert step_flops(packed) - 3 * want == pytest.approx(ref, rel=1e-9)  # reference unchanged
    assert 3 * want < 0.55 * (step_flops(two) - ref)
    lay = [x for x in layouts(two)[0] if x.cp > 1][0]
    # gpu engine: packed rows run the project attention (more saved per token than TE's)
    assert estimate(packed, lay).activations < 0.65 * estimate(two, lay).activations
    cpu = dict(engine="cpu")  # same attention on both sides: about half
    ratio = (
        estimate(replace(packed, **cpu), lay).activations
        / estimate(replace(two, **cpu), lay).activations
    )
    assert 0.5 < ratio < 0.55
    with pytest.raises(PlanError, match="shared-prefix-branch"):
        plan(replace(two, shared_prefix_branch=131072))


class _OneRank:
    """A CP group of one (sequence_sums reduces nothing)."""

    def size(self) -> int:
        return 1


def _fake_logps(batch: dict, k: list[int]) -> torch.Tensor:
    """Per-label log-probs that depend on the label, its position and (after the shared
    prompt) its side, as a real model's would: identical for the shared prompt in both rows."""
    rows, seq = batch["labels"].shape
    pairs = len(k)
    packed = "branch" in batch
    side = batch["branch"] if packed else torch.zeros(rows, seq, dtype=torch.int64)
    if not packed:
        for r in range(rows):
            side[r, k[r % pairs] :] = 1 if r < pairs else 2
    pos = batch["position_ids"]
    return -(0.01 * batch["labels"] + 0.003 * pos + 0.5 * side).float().sin().abs()


@pytest.mark.parametrize("scope", ["full", "response"])
def test_packed_sums_equal_two_sequence_sums(turn_data, scope):
    """Every per-pair sum the objective sees (responses, NLL numerator and count, sft_kl's KL
    terms) is the same from packed rows as from two sequences."""
    from longpo_megatron.data.collate import (
        collate_pairs,
        collate_shared_prefix,
        place_chosen_token_values,
        shared_prefix_length,
    )
    from longpo_megatron.loss.layer import sequence_sums, unpack_shared_prefix

    dataset = _dataset(turn_data)
    pairs = [dataset[i] for i in range(4)]
    k = [shared_prefix_length(p) for p in pairs]
    scores = [(-1.0 - i, -2.0 - i) for i in range(4)]
    ref_tok = [torch.linspace(-1, 0, sum(p.chosen_response_mask[1:])) for p in pairs]
    sums = []
    for collate in (collate_pairs, collate_shared_prefix):
        batch = place_chosen_token_values(collate(pairs, 256, 8, scores), ref_tok)
        logp, rows = unpack_shared_prefix(_fake_logps(batch, k), batch)
        sums.append(sequence_sums(logp, rows, scope, _OneRank()))
    two, packed = sums
    for field in ("policy_chosen", "policy_rejected", "nll_sum", "nll_count", "kl_sum"):
        assert torch.allclose(getattr(packed, field), getattr(two, field), rtol=1e-6), field
    assert torch.equal(packed.ref_rejected, two.ref_rejected)
