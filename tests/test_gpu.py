"""GPU tier: runs where CUDA is present (a lent H100/H200), skips cleanly elsewhere.

- the project core attention on CUDA equals the CPU result;
- megatron's engine (Megatron DDP, distributed optimizer, get_forward_backward_func) gives the
  same loss as the CPU engine on the same weights (world of one rank, fp32);
- the TransformerEngine layer spec builds and runs when TE is importable.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


def _batch(device: str, seq: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 264, (2, seq), generator=g)
    resp = torch.zeros(2, seq)
    resp[:, seq // 2 :] = 1.0
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(2, seq).contiguous(),
        "labels": torch.roll(tokens, -1, 1),
        "response_mask": resp,
        "real_mask": torch.ones(2, seq),
        "ref_logps": torch.tensor([-50.0, -55.0]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def test_local_attention_cuda_matches_cpu():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from longpo_megatron.model.attention import LocalCoreAttention

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
    )
    attn = LocalCoreAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = torch.randn(16, 2, 4, 16), torch.randn(16, 2, 2, 16), torch.randn(16, 2, 2, 16)
    cpu = attn(q, k, v, None)
    gpu = attn.cuda()(q.cuda(), k.cuda(), v.cuda(), None).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)


def _engine_loss(single_rank_group, engine_kind: str) -> float:
    from longpo_megatron.config import LongPOConfig, ModelConfig, OptimConfig
    from longpo_megatron.distributed import init_model_parallel, seed_all
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    groups = init_model_parallel(1, 1, 1)
    seed_all(3, groups, cuda=True)
    layout = ModelLayout(1, 1, 1, False, "local", "gpu", "fp32")
    model = build_model(ModelConfig(), layout, groups)
    step = make_train_forward_step(
        LongPOLossLayer(LongPOConfig(), LossGroups(groups.tp, groups.cp))
    )
    if engine_kind == "megatron":
        from longpo_megatron.schedule.megatron_engine import MegatronEngine

        engine = MegatronEngine(model, groups, OptimConfig(lr=1e-4), micro_pairs=1)
    else:
        engine = CpuEngine(model, groups, OptimConfig(lr=1e-4))
    result = engine.train_step(step, [_batch("cuda")], 1e-4)
    return float(result.metrics[0]["loss"].sum())


def test_megatron_engine_matches_project_engine(single_rank_group):
    ours = _engine_loss(single_rank_group, "cpu")
    theirs = _engine_loss(single_rank_group, "megatron")
    assert theirs == pytest.approx(ours, rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs TE")
def test_te_spec_forward(single_rank_group):
    from longpo_megatron.config import ModelConfig
    from longpo_megatron.distributed import init_model_parallel, seed_all
    from longpo_megatron.model.gpt import ModelLayout, build_model

    groups = init_model_parallel(1, 1, 1)
    seed_all(0, groups, cuda=True)
    model = build_model(ModelConfig(), ModelLayout(1, 1, 1, False, "te", "gpu", "bf16"), groups)
    b = _batch("cuda")
    out = model(b["tokens"], b["position_ids"], None)
    assert out.shape == (32, 2, 64) and torch.isfinite(out.float()).all()
