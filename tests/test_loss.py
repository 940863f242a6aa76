"""LongPO loss: hand-computed examples and the chunked log-prob kernel vs plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longpo_megatron.config import LongPOConfig
from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups, logit_positions, sequence_sums
from longpo_megatron.loss.logprobs import chunked_logprobs
from longpo_megatron.loss.objective import PairSums, longpo_objective


def _sums(**kw) -> PairSums:
    return PairSums(**{k: torch.tensor(v, dtype=torch.float64) for k, v in kw.items()})


def test_objective_hand_computed():
    s = _sums(
        policy_chosen=[-10.0],
        policy_rejected=[-12.0],
        ref_chosen=[-11.0],
        ref_rejected=[-11.0],
        nll_sum=[6.0],
        nll_count=[3.0],
    )
    loss, m = longpo_objective(s, beta=0.1, lam=0.5)
    delta = 0.1 * ((-10 + 11) - (-12 + 11))  # 0.2
    pref = math.log1p(math.exp(-delta))
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.2)
    assert m["rewards/accuracy"].item() == 1.0
    assert m["pref_loss"].item() == pytest.approx(pref, rel=1e-12)
    assert loss.item() == pytest.approx(2.0 + 0.5 * pref, rel=1e-12)


@pytest.mark.parametrize(
    "kind,expected",
    [("ipo", (0.2 / 0.1 - 1 / 0.2) ** 2), ("hinge", 0.8), ("sigmoid", math.log1p(math.exp(-0.2)))],
)
def test_preference_variants(kind, expected):
    s = _sums(
        policy_chosen=[-10.0],
        policy_rejected=[-12.0],
        ref_chosen=[-11.0],
        ref_rejected=[-11.0],
        nll_sum=[6.0],
        nll_count=[3.0],
    )
    _, m = longpo_objective(s, beta=0.1, lam=1.0, preference_loss=kind)
    assert m["pref_loss"].item() == pytest.approx(expected, rel=1e-12)


def test_sft_variant_drops_preference():
    s = _sums(
        policy_chosen=[-1.0],
        policy_rejected=[-2.0],
        ref_chosen=[0.0],
        ref_rejected=[0.0],
        nll_sum=[4.0],
        nll_count=[2.0],
    )
    loss, _ = longpo_objective(s, beta=0.1, lam=10.0, variant="sft")
    assert loss.item() == pytest.approx(2.0)


def _toy_batch():
    """2 pairs, S=6. Row layout: chosen0, chosen1, rejected0, rejected1. Two turns per row."""
    logp = torch.tensor(
        [
            [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
            [-0.5, -0.5, -0.5, -0.5, -0.5, -0.5],
            [-2.0, -2.0, -2.0, -2.0, -2.0, -2.0],
            [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0],
        ],
        dtype=torch.float64,
    )
    resp = torch.tensor(
        [[0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]],
        dtype=torch.float32,
    )
    real = torch.tensor(
        [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]],
        dtype=torch.float32,
    )
    batch = {
        "response_mask": resp,
        "real_mask": real,
        "ref_logps": torch.tensor([-4.0, -1.0, -3.0, -2.0]),
    }
    return logp, batch


def test_sequence_sums_multi_turn_masks_and_padding(single_rank_group):
    logp, batch = _toy_batch()
    s = sequence_sums(logp, batch, "full", single_rank_group)
    # turn sums: chosen0 = -2-3 (turn 1) + -5 (turn 2); pads and prompts excluded
    assert s.policy_chosen.tolist() == [-10.0, -1.5]
    assert s.policy_rejected.tolist() == [-4.0, -2.0]
    assert s.nll_sum.tolist() == [15.0, 3.0]  # full scope: every real label of chosen rows
    assert s.nll_count.tolist() == [5.0, 6.0]
    r = sequence_sums(logp, batch, "responses", single_rank_group)
    assert r.nll_sum.tolist() == [10.0, 1.5]
    assert r.nll_count.tolist() == [3.0, 3.0]
    assert s.ref_chosen.tolist() == [-4.0, -1.0] and s.ref_rejected.tolist() == [-3.0, -2.0]


def test_logit_positions_skip_pads_and_prompts():
    _, batch = _toy_batch()
    sel = logit_positions(batch, "responses")
    assert torch.equal(sel, batch["response_mask"].bool())
    full = logit_positions(batch, "full")
    assert torch.equal(full[:2], batch["real_mask"][:2].bool())
    assert torch.equal(full[2:], batch["response_mask"][2:].bool())


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_logprobs_match_log_softmax(chunk):
    torch.manual_seed(0)
    h = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (7,))
    g = torch.randn(7, dtype=torch.float64)
    lp = chunked_logprobs(h, w, t, 0, chunk, None)
    (lp * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.log_softmax(h @ w.t(), -1).gather(-1, t[:, None]).squeeze(-1)
    (ref * g).sum().backward()
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-10)


def test_loss_layer_end_to_end_against_plain_pytorch(single_rank_group):
    """Whole layer at TP=1 vs full logits + log_softmax + the formula written out here."""
    torch.manual_seed(1)
    logp_unused, batch = _toy_batch()
    labels = torch.randint(0, 11, (4, 6))
    batch = dict(batch, labels=labels)
    hidden = torch.randn(6, 4, 8, requires_grad=True)  # [s, b, h]
    weight = torch.randn(11, 8, requires_grad=True)
    cfg = LongPOConfig(beta=0.1, lam=0.3, nll_scope="full", logits_chunk_size=4)
    layer = LongPOLossLayer(cfg, LossGroups(single_rank_group, single_rank_group))
    loss, metrics = layer(hidden, batch, weight)
    loss.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    lp = F.log_softmax(hidden.transpose(0, 1) @ weight.t(), -1).gather(-1, labels[..., None])[
        ..., 0
    ]
    resp, real, ref = batch["response_mask"], batch["real_mask"], batch["ref_logps"]
    pol = (lp * resp).sum(-1)
    nll = -(lp[:2] * real[:2]).sum(-1) / real[:2].sum(-1)
    delta = 0.1 * ((pol[:2] - ref[:2]) - (pol[2:] - ref[2:]))
    expect = (nll + 0.3 * -F.logsigmoid(delta)).mean()
    expect.backward()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-5, atol=1e-6)
    assert metrics["pairs"].item() == 2
    assert metrics["rewards/margins"].item() == pytest.approx(delta.sum().item(), rel=1e-5)


def test_token_kl_is_k3_estimator():
    from longpo_megatron.loss.objective import token_kl

    policy, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    r = ref - policy  # [-0.5, 1.0, 0.0]
    want = torch.exp(r) - 1 - r
    torch.testing.assert_close(token_kl(policy, ref), want)
    assert want[2] == 0 and (want >= 0).all()


def test_sft_kl_layer_against_plain_pytorch(single_rank_group):
    """NLL + λ·mean over chosen response tokens of (e^r − 1 − r), r = ref − policy; rejected
    rows get no gradient."""
    torch.manual_seed(2)
    _, batch = _toy_batch()
    labels = torch.randint(0, 11, (4, 6))
    ref_tok = -torch.rand(4, 6) * batch["response_mask"]
    ref_tok[2:] = 0
    batch = dict(batch, labels=labels, ref_token_logps=ref_tok)
    hidden = torch.randn(6, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    cfg = LongPOConfig(loss="sft_kl", lam=0.7, nll_scope="full", logits_chunk_size=5)
    layer = LongPOLossLayer(cfg, LossGroups(single_rank_group, single_rank_group))
    loss, metrics = layer(hidden, batch, weight)
    loss.backward()
    gh = hidden.grad.clone()
    hidden.grad = None

    lp = F.log_softmax(hidden.transpose(0, 1) @ weight.t(), -1).gather(-1, labels[..., None])[
        ..., 0
    ]
    resp, real = batch["response_mask"][:2], batch["real_mask"][:2]
    nll = -(lp[:2] * real).sum(-1) / real.sum(-1)
    r = ref_tok[:2] - lp[:2]
    kl = ((torch.exp(r) - 1 - r) * resp).sum(-1) / resp.sum(-1)
    expect = (nll + 0.7 * kl).mean()
    expect.backward()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-5, atol=1e-6)
    assert metrics["kl"].item() == pytest.approx(kl.sum().item(), rel=1e-5)
    assert not gh[:, 2:].any()  # rejected rows do not enter sft_kl
