"""GPU tier: the production path on one CUDA device (a lent H100/H200); skips cleanly elsewhere.

``scripts/gpu_check.sh`` runs this file as ``pytest -m gpu``. One process, a world of one rank
(gloo for CPU tensors, NCCL for CUDA tensors). What it proves:

- megatron's engine (schedules, Megatron DDP, the distributed optimizer on and off) trains like the
  project engine on the same weights and batches: 3 AdamW steps, fp32, loss, metrics, grad norm and
  weights within 1e-5;
- bf16 (Float16Module, fp32 main params) tracks fp32 over 10 steps within the tolerances below;
- activation recompute (full, selective) leaves loss and gradients unchanged on CUDA;
- a checkpoint saved on CUDA resumes bitwise on CPU (weights) and on CUDA (weights, optimizer);
- the project attention on CUDA at 32K tokens matches the blockwise kernel;
- packed shared-prefix rows through compiled FlexAttention (the local backend's CUDA packed
  path and ``model.attention_backend=flex``) match the blockwise kernel / plain attention;
- the TransformerEngine spec, when TE is importable: build, forward, backward, TE attention vs
  project attention.
"""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
from parity_common import assert_tensors_close, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]
needs_te = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="needs TransformerEngine"
)

FP32_TOL = 1e-5
"""MegatronEngine vs CpuEngine, fp32: loss, metrics, grad norm, weights (relative)."""
BF16_LOSS_TOL = 5e-3
"""bf16 vs fp32, every step's loss (relative): about one bf16 ε (3.9e-3). Measured on CPU with the
project engine and plain bf16 weights (no fp32 main params, so worse): at most 1.1e-4."""
BF16_WEIGHT_TOL = 1e-2
"""bf16 vs fp32 after 10 steps, whole-model weight relative error. Measured on CPU as above:
2.2e-3 (bf16 rounding of the weights alone is ≈ 1e-3)."""
OPTIM = dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1, clip_grad=1.0, adam_eps=1e-6)
REF_HYPER = dict(beta=0.1, lam=0.5, nll_scope="full")
"""The objective's settings, for the loss layer and for reference_impl alike."""
TRAIN_ITERS = 10


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Plain fp32 matmuls (no TF32) so fp32 comparisons mean fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def groups():
    """A one-rank world that reduces CUDA tensors with NCCL and CPU tensors with gloo."""
    from longpo_megatron import distributed

    if dist.is_initialized() and "nccl" not in str(dist.get_backend()):
        distributed.destroy()  # a gloo-only world from another test module: megatron needs NCCL
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.cuda.set_device(0)
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    return distributed.init_model_parallel(1, 1, 1)


def _model_cfg(**kw):
    from longpo_megatron.config import ModelConfig

    return ModelConfig(add_qkv_bias=True, **kw)


def _build(groups, precision: str = "fp32", recompute: str = "none", engine: str = "gpu", seed=3):
    """The tiny model on CUDA (engine gpu) or CPU (engine cpu), weights from ``seed``."""
    from longpo_megatron.distributed import seed_all
    from longpo_megatron.model.gpt import ModelLayout, build_model

    seed_all(seed, groups, cuda=torch.cuda.is_available())
    layout = ModelLayout(1, 1, 1, False, "local", engine, precision)
    return build_model(_model_cfg(recompute=recompute), layout, groups)


def _twin(model: torch.nn.Module, groups, **kw) -> torch.nn.Module:
    """A second model with ``model``'s weights (cast to its own dtype)."""
    other = _build(groups, seed=11, **kw)
    weights = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    other.load_state_dict(weights, strict=False)
    assert all(torch.equal(p, weights[n].to(p.dtype)) for n, p in other.named_parameters())
    return other


def _pair_batch(seed: int, seq: int = 32, device: str = "cuda") -> dict[str, torch.Tensor]:
    """One pair: row 0 chosen, row 1 rejected, a shared prompt then a response."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 264, (2, seq), generator=g)
    resp = torch.zeros(2, seq)
    resp[:, seq // 2 :] = 1.0
    batch = {
        "tokens": tokens,
        "position_ids": torch.arange(seq).expand(2, seq).contiguous(),
        "labels": torch.roll(tokens, -1, 1),
        "response_mask": resp,
        "real_mask": torch.ones(2, seq),
        "ref_logps": -seq * torch.rand(2, generator=g) - seq,
    }
    return {k: v.to(device) for k, v in batch.items()}


def _steps(n: int) -> list[list[dict[str, torch.Tensor]]]:
    """``n`` global batches of two one-pair micro-batches each (lengths vary per step)."""
    return [[_pair_batch(10 * s + m, seq=32 + 8 * (s % 3)) for m in range(2)] for s in range(n)]


def _engine(kind: str, model, groups, distributed_optimizer: bool = True):
    from longpo_megatron.config import OptimConfig
    from longpo_megatron.schedule.engine import CpuEngine

    cfg = OptimConfig(use_distributed_optimizer=distributed_optimizer, **OPTIM)
    if kind == "cpu":
        return CpuEngine(model, groups, cfg)
    from longpo_megatron.schedule.megatron_engine import MegatronEngine

    return MegatronEngine(model, groups, cfg, micro_pairs=1)


def _forward_step(groups):
    from longpo_megatron.config import LongPOConfig
    from longpo_megatron.loss.layer import LongPOLossLayer, LossGroups
    from longpo_megatron.schedule.forward_step import make_train_forward_step

    loss = LongPOLossLayer(LongPOConfig(**REF_HYPER), LossGroups(groups.tp, groups.cp))
    return make_train_forward_step(loss)


def _train(engine, groups, batches, start: int = 0) -> list[dict[str, float]]:
    """Run the steps (the first is step ``start``); per step the summed metrics and grad norm."""
    from longpo_megatron.config import OptimConfig
    from longpo_megatron.optim import lr_at

    step_fn, cfg, out = _forward_step(groups), OptimConfig(**OPTIM), []
    for i, batch in enumerate(batches, start):
        result = engine.train_step(step_fn, batch, lr_at(i, cfg, TRAIN_ITERS))
        assert not result.skipped, f"step {i}: optimizer skipped the update"
        sums = {k: sum(float(m[k].sum()) for m in result.metrics) for k in result.metrics[0]}
        out.append(sums | {"grad_norm": result.grad_norm})
    return out


def _full_state(model: torch.nn.Module, groups) -> dict[str, torch.Tensor]:
    """Weights in the canonical megatron layout the reference implementation reads."""
    from gather import gather_full_state

    return gather_full_state(model, groups, num_layers=_model_cfg().num_layers)


def _reference_run(model: torch.nn.Module, groups, batches):
    """The same steps replayed on CPU by ``reference_impl`` (plain PyTorch) from ``model``'s
    weights: per step (mean loss, metrics, grad norm) and the final weights."""
    from parity_common import ref_config
    from reference_impl import from_megatron_state_dict, reference_train, to_megatron_state_dict

    from longpo_megatron.config import OptimConfig

    cfg, opt = ref_config(), OptimConfig(**OPTIM)
    ref = from_megatron_state_dict(_full_state(model, groups), cfg)
    cpu = [[{k: v.cpu() for k, v in mb.items()} for mb in step] for step in batches]
    history = reference_train(
        ref,
        cpu,
        steps=len(cpu),
        lr=opt.lr,
        min_lr=opt.min_lr,
        warmup_fraction=opt.warmup_fraction,
        train_iters=TRAIN_ITERS,
        weight_decay=opt.weight_decay,
        betas=(opt.adam_beta1, opt.adam_beta2),
        eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        **REF_HYPER,
    )
    return history, to_megatron_state_dict(ref, cfg)


def _assert_matches_reference(got, final, ref_history, ref_final) -> None:
    """Per step loss and grad norm, final weights: the tolerances of test_parallel_parity."""
    for step, (g, (loss, _, norm)) in enumerate(zip(got, ref_history)):
        assert g["loss"] / g["pairs"] == pytest.approx(loss, rel=FP32_TOL), f"step {step} loss"
        assert g["grad_norm"] == pytest.approx(norm, rel=FP32_TOL), f"step {step} grad norm"
    assert_tensors_close(final, ref_final, FP32_TOL, "weights vs reference_impl", 1e-4)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def _close(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


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


@pytest.mark.parametrize("distributed_optimizer", [True, False], ids=["distopt", "plainopt"])
def test_megatron_engine_matches_project_engine(groups, distributed_optimizer):
    """3 steps, fp32, same weights and batches: megatron's path equals the project engine."""
    ours_model = _build(groups)
    theirs_model = _twin(ours_model, groups)
    batches = _steps(3)
    ours = _train(_engine("cpu", ours_model, groups), groups, batches)
    theirs = _train(
        _engine("megatron", theirs_model, groups, distributed_optimizer), groups, batches
    )
    for step, (a, b) in enumerate(zip(theirs, ours)):
        assert a.keys() == b.keys()
        for key in b:
            tol = FP32_TOL * max(1.0, abs(b[key]))  # relative; metrics near 0 absolutely
            assert abs(a[key] - b[key]) <= tol, f"step {step} {key}: {a[key]} vs {b[key]}"
    assert_tensors_close(_weights(theirs_model), _weights(ours_model), FP32_TOL, "weights")


def test_megatron_engine_matches_reference_impl(groups):
    """The independent check: plain PyTorch (reference_impl) replays the 3 steps on CPU from the
    same weights; megatron's path on CUDA must agree as the CPU parity tests do."""
    model = _build(groups)
    batches = _steps(3)
    ref_history, ref_final = _reference_run(model, groups, batches)
    got = _train(_engine("megatron", model, groups), groups, batches)
    _assert_matches_reference(got, _full_state(model, groups), ref_history, ref_final)


def test_bf16_tracks_fp32_over_10_steps(groups):
    """Float16Module + fp32 main params vs fp32, 10 steps on the megatron engine."""
    fp32 = _build(groups)
    bf16 = _twin(fp32, groups, precision="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    batches = _steps(TRAIN_ITERS)
    want = _train(_engine("megatron", fp32, groups), groups, batches)
    got = _train(_engine("megatron", bf16, groups), groups, batches)
    worst = max(_close(g["loss"], w["loss"]) for g, w in zip(got, want))
    assert worst <= BF16_LOSS_TOL, f"bf16 loss differs from fp32 by {worst:.2e} (relative)"
    err = rel_err(
        torch.cat([v.flatten() for v in _weights(bf16).values()]),
        torch.cat([v.flatten() for v in _weights(fp32).values()]),
    )
    assert err <= BF16_WEIGHT_TOL, f"bf16 weights after 10 steps: relative error {err:.2e}"


def _grads(groups, recompute: str):
    model = _build(groups, recompute=recompute, seed=7)
    step = _forward_step(groups)
    batch = _pair_batch(0, seq=48)
    hidden, loss_func = step(iter([batch]), model)
    loss, _ = loss_func(hidden)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_leaves_gradients_unchanged_on_cuda(groups, mode):
    """The GPU layout also sets megatron's own recompute on TransformerConfig."""
    base_loss, base = _grads(groups, "none")
    loss, grads = _grads(groups, mode)
    torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=0)
    assert grads.keys() == base.keys()
    for name in base:
        torch.testing.assert_close(grads[name], base[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_saved_on_cuda_resumes_bitwise_on_cpu_and_cuda(groups, tmp_path):
    """Save after 2 steps on CUDA; CPU reload gives the same weights bit for bit; a CUDA resume
    then takes step 3 exactly as the uninterrupted run does (math attention: deterministic)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longpo_megatron import checkpoint

    batches = _steps(3)
    with sdpa_kernel(SDPBackend.MATH):
        model = _build(groups)
        engine = _engine("megatron", model, groups)
        _train(engine, groups, batches[:2])
        state = {"step": 2, "consumed_pairs": 4, "sampler": {}}
        path = checkpoint.save(
            tmp_path, 2, model, groups, optimizer=engine.optimizer, train_state=state
        )
        saved = _weights(model)
        cpu_model = _build(groups, engine="cpu", seed=21)
        assert next(cpu_model.parameters()).device.type == "cpu"
        loaded = checkpoint.load(path, cpu_model, groups, restore_rng=False)
        assert loaded.train_state["step"] == 2
        for name, want in saved.items():
            assert torch.equal(dict(cpu_model.named_parameters())[name].detach(), want), name

        resumed_model = _build(groups, seed=22)
        resumed = _engine("megatron", resumed_model, groups)
        loaded = checkpoint.load(path, resumed_model, groups, optimizer=resumed.optimizer)
        assert loaded.optimizer_restored
        for name, want in saved.items():
            got = dict(resumed_model.named_parameters())[name].detach().cpu()
            assert torch.equal(got, want), name
        # step 3 reads the restored Adam moments: equal metrics and weights prove them
        after = _train(engine, groups, batches[2:], start=2)
        after_resumed = _train(resumed, groups, batches[2:], start=2)
    assert after_resumed == after
    for name, want in _weights(model).items():
        assert torch.equal(_weights(resumed_model)[name], want), name


def test_project_attention_at_32k_matches_blockwise_kernel():
    """LocalCoreAttention (SDPA, causal) vs the blockwise kernel, 32K tokens, GQA, fwd+bwd."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from longpo_megatron.model.attention import LocalCoreAttention
    from longpo_megatron.model.attention_mask import AttentionMask
    from longpo_megatron.model.blockwise_attention import blockwise_attention

    seq, heads, groups_, dim = 32768, 8, 2, 64
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=groups_,
        use_cpu_initialization=True,
    )
    attn = LocalCoreAttention(cfg, 1, AttnMaskType.causal, "self").cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def mk(h):  # [s, b, h, d], megatron's layout
        return torch.randn(seq, 1, h, dim, device="cuda", generator=gen).requires_grad_()

    q, k, v = mk(heads), mk(groups_), mk(groups_)
    grad = torch.randn(seq, 1, heads * dim, device="cuda", generator=gen)
    out = attn(q, k, v, None)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))

    def bhsd(x):
        return x.permute(1, 2, 0, 3)

    mask = AttentionMask.causal(1, seq, device="cuda")
    ref = blockwise_attention(bhsd(q), bhsd(k), bhsd(v), mask, dim**-0.5, 1024, 1024)
    ref = ref.permute(2, 0, 1, 3).reshape(seq, 1, heads * dim)
    want = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    assert rel_err(out.detach(), ref.detach()) <= 1e-5
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) <= 1e-4, f"d{name}: relative error {rel_err(a, b):.2e}"


@needs_te
def test_te_spec_forward_backward(groups):
    from longpo_megatron.distributed import seed_all
    from longpo_megatron.model.gpt import ModelLayout, build_model

    seed_all(0, groups, cuda=True)
    layout = ModelLayout(1, 1, 1, False, "te", "gpu", "bf16")
    model = build_model(_model_cfg(), layout, groups)
    b = _pair_batch(0)
    out = model(b["tokens"], b["position_ids"], None)
    assert out.shape == (32, 2, 64) and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@needs_te
def test_te_attention_matches_project_attention(groups):
    """TEDotProductAttention vs LocalCoreAttention on the same bf16 q, k, v (causal, GQA)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from longpo_megatron.model.attention import LocalCoreAttention
    from longpo_megatron.model.gpt import ModelLayout, transformer_config

    tcfg = transformer_config(
        _model_cfg(hidden_size=256, num_attention_heads=4, num_query_groups=2),
        ModelLayout(1, 1, 1, False, "te", "gpu", "bf16"),
    )
    kw = dict(pg_collection=groups.pg_collection)
    te = TEDotProductAttention(tcfg, 1, AttnMaskType.causal, "self", **kw)
    ours = LocalCoreAttention(tcfg, 1, AttnMaskType.causal, "self", **kw).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(512, 2, h, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        for h in (4, 2, 2)
    )
    got = te(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    want = ours(q, k, v, None)
    assert got.shape == want.shape
    assert rel_err(got.float(), want.float()) <= 1e-2


def test_packed_shared_prefix_attention_matches_blockwise_kernel():
    """data.shared_prefix rows on CUDA: the project attention's packed path (compiled
    FlexAttention, block-sparse mask) vs the blockwise kernel, two rows of different prompts."""
    from test_shared_prefix import check_packed_attention

    check_packed_attention("cuda", 4096, (3000, 1111), 400)


def test_flex_backend_packed_rows_match_plain_attention():
    """model.attention_backend=flex on CUDA (compiled flex_attention, Triton): packed rows of
    8K tokens vs dense masked attention written out, fwd + bwd (grads 1e-4: fp32 atomics)."""
    from test_flex_attention import check_flex_attention

    check_flex_attention("cuda", 8192, (6000, 2500), 700, tol=1e-4)
