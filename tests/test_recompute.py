"""Activation recomputation (full layers, selective attention) keeps loss and gradients."""

from __future__ import annotations

import pytest
import torch

from longpo_megatron.config import LongPOConfig, ModelConfig
from longpo_megatron.distributed import init_model_parallel
from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
from longpo_megatron.model.gpt import ModelLayout, build_model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 264, (4, 24), generator=g)
    resp = (torch.rand(4, 24, generator=g) > 0.5).float()
    return {
        "tokens": tokens,
        "position_ids": torch.arange(24).expand(4, 24),
        "labels": torch.roll(tokens, -1, dims=1),
        "response_mask": resp,
        "real_mask": torch.ones(4, 24),
        "ref_logps": torch.tensor([-30.0, -31.0, -29.0, -32.0]),
    }


def _grads(recompute: str, groups) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    layout = ModelLayout(1, 1, 1, False, "local", "cpu", "fp32")
    model = build_model(ModelConfig(recompute=recompute, add_qkv_bias=True), layout, groups)
    layer = LongPOLossLayer(LongPOConfig(beta=0.1, lam=1.0), LossGroups(groups.tp, groups.cp))
    batch = _batch()
    hidden = model(batch["tokens"], batch["position_ids"], None)
    loss, _ = layer(hidden, batch, model.output_weight())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_leaves_gradients_unchanged(single_rank_group, mode):
    groups = init_model_parallel(1, 1, 1)
    base_loss, base = _grads("none", groups)
    loss, grads = _grads(mode, groups)
    assert torch.equal(loss, base_loss)
    assert grads.keys() == base.keys()
    for name in base:
        torch.testing.assert_close(grads[name], base[name], rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_variants_are_chosen_in_the_spec():
    from longpo_megatron.model.attention import RecomputedLocalCoreAttention
    from longpo_megatron.model.spec import RecomputedTransformerLayer, local_layer_spec

    assert local_layer_spec("full").module is RecomputedTransformerLayer
    attn = local_layer_spec("selective").submodules.self_attention.submodules.core_attention
    assert attn is RecomputedLocalCoreAttention


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_is_done_once_on_the_gpu_layout(mode):
    """Local spec: the module variant recomputes, megatron's config does not (no double
    recompute); TE spec: megatron's config does."""
    from longpo_megatron.model.gpt import transformer_config

    cfg = ModelConfig(recompute=mode)
    local = transformer_config(cfg, ModelLayout(1, 1, 1, False, "local", "gpu", "bf16"))
    assert local.recompute_granularity is None
    te = transformer_config(cfg, ModelLayout(1, 1, 1, False, "te", "gpu", "bf16"))
    assert te.recompute_granularity == mode
