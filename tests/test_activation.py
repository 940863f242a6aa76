"""The local specs' SwiGLU module equals megatron's own gated MLP path, bit for bit, and holds
one ``[tokens, ffn]`` activation less for backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mlp(use_module: bool, single_rank_group):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from longpo_megatron.model.spec import local_layer_spec

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        ffn_hidden_size=24,
        num_attention_heads=2,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        use_te_activation_func=use_module,
        use_cpu_initialization=True,
    )
    spec = local_layer_spec().submodules.mlp
    torch.manual_seed(0)
    return spec.module(cfg, submodules=spec.submodules, tp_group=single_rank_group)


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_swiglu_module_equals_megatron_glu(single_rank_group):
    ours, theirs = _mlp(True, single_rank_group), _mlp(False, single_rank_group)
    assert type(ours.activation_func).__name__ == "SwiGLU"
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(7, 3, 16, generator=torch.Generator().manual_seed(1))
    grads, saved = [], []
    for mlp in (ours, theirs):
        h = x.clone().requires_grad_()
        (out, _), nbytes = _saved_bytes(lambda m=mlp, h=h: m(h))
        out.pow(2).sum().backward()
        grads.append((out.detach(), h.grad, *(p.grad for p in mlp.parameters())))
        saved.append(nbytes)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert saved[1] - saved[0] == 7 * 3 * 24 * 4  # megatron's `up + 0.0` copy is not held
