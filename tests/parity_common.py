"""Shared pieces of the distributed parity tests: a run config, the rank worker, and the
single-process replay of the same steps with the independent reference implementation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from gather import gather_full_state
from reference_impl import RefConfig, from_megatron_state_dict, ref_short_logps, reference_train

TINY = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=160,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=264,
    add_qkv_bias=True,
)
STEPS = 3
GLOBAL_BATCH = 4
HYPER = dict(beta=0.1, lam=0.5, nll_scope="full")
OPTIM = dict(
    lr=1e-3,
    min_lr=1e-4,
    warmup_fraction=0.34,
    weight_decay=0.1,
    clip_grad=1.0,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_eps=1e-6,
)


def parity_config(
    tp: int,
    pp: int,
    cp: int,
    data_path: str,
    out_dir: str,
    shared_prefix: bool = False,
    attention_backend: str = "auto",
):
    """The run every parity test trains: tiny Qwen2-like model (QKV bias), fp32, 3 steps."""
    from longpo_megatron.config import Config

    cfg = Config()
    for k, v in TINY.items():
        setattr(cfg.model, k, v)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.parallel.context_parallel_size = cp
    cfg.parallel.engine = "cpu"
    for k, v in HYPER.items():
        setattr(cfg.longpo, k, v)
    cfg.longpo.logits_chunk_size = 96  # several chunks per sequence
    for k, v in OPTIM.items():
        setattr(cfg.optim, k, v)
    cfg.data.path = data_path
    cfg.train.train_iters = STEPS
    cfg.train.global_batch_size = GLOBAL_BATCH
    cfg.train.micro_batch_size = 1
    cfg.logging.output_dir = out_dir
    cfg.logging.tensorboard = False
    cfg.data.shared_prefix = shared_prefix
    cfg.model.attention_backend = attention_backend
    return cfg


def parity_worker(
    rank: int,
    world: int,
    *,
    tp: int,
    pp: int,
    cp: int,
    data_path: str,
    out_dir: str,
    shared_prefix: bool = False,
    attention_backend: str = "auto",
) -> dict[str, Any]:
    """Train STEPS steps distributed; return gathered weights/grads (rank 0) and metrics."""
    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.trainer import Trainer

    cfg = parity_config(tp, pp, cp, data_path, out_dir, shared_prefix, attention_backend)
    layout = validate_config(cfg, world_size=world, cuda_available=False)
    trainer = Trainer(cfg, layout).setup()
    g, layers = trainer.groups, cfg.model.num_layers
    out: dict[str, Any] = {"init": gather_full_state(trainer.model, g, num_layers=layers)}
    out["ref_table"] = trainer.dataset.ref_state()
    out["batches"], out["history"] = [], []
    for step in range(STEPS):
        out["batches"].append(copy.deepcopy(trainer.sampler).next_global_batch(GLOBAL_BATCH))
        out["history"].append(trainer.train_step())
        if step == 0:
            out["grads1"] = gather_full_state(trainer.model, g, grads=True, num_layers=layers)
    out["final"] = gather_full_state(trainer.model, g, num_layers=layers)
    out["logging_rank"] = g.is_logging_rank
    trainer.close()
    return out


def ref_config() -> RefConfig:
    return RefConfig(kv_channels=None, **TINY)


def reference_table(model: torch.nn.Module, dataset) -> torch.Tensor:
    """Σ log π_ref over each pair's short per-turn sequences, scored by the reference impl."""
    from longpo_megatron.data.collate import collate_short

    table = torch.zeros(len(dataset), 2, dtype=torch.float64)
    for i in range(len(dataset)):
        pair = dataset[i]
        for side, seqs in enumerate((pair.ref_chosen, pair.ref_rejected)):
            batch = collate_short(seqs, pad_id=256)
            table[i, side] = ref_short_logps(model, batch).double().sum()
    return table


def global_batches(dataset, table: torch.Tensor, batches: list[list[int]]) -> list[list[dict]]:
    """Each step's global batch as single-pair micro-batches with reference-impl scores."""
    from longpo_megatron.data.collate import collate_pairs

    return [
        [collate_pairs([dataset[i]], 256, 1, [tuple(table[i].tolist())]) for i in idx]
        for idx in batches
    ]


def replay(init: dict[str, torch.Tensor], dataset, batches: list[list[int]], steps: int):
    """Reference scores, then STEPS AdamW steps; returns (table, history, step-1 grads, final)."""
    from reference_impl import grads_to_megatron, to_megatron_state_dict

    cfg = ref_config()
    model = from_megatron_state_dict(init, cfg)
    table = reference_table(model, dataset)
    gb = global_batches(dataset, table, batches)
    kw = dict(
        lr=OPTIM["lr"],
        min_lr=OPTIM["min_lr"],
        warmup_fraction=OPTIM["warmup_fraction"],
        train_iters=STEPS,
        weight_decay=OPTIM["weight_decay"],
        betas=(OPTIM["adam_beta1"], OPTIM["adam_beta2"]),
        eps=OPTIM["adam_eps"],
        clip_grad=OPTIM["clip_grad"],
        **HYPER,
    )
    one = from_megatron_state_dict(init, cfg)
    reference_train(one, gb, steps=1, **kw)
    grads1 = grads_to_megatron(one, cfg)
    history = reference_train(model, gb, steps=steps, **kw)
    return table, history, grads1, to_megatron_state_dict(model, cfg)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b|| (absolute when b is all zeros)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_tensors_close(
    got: dict, want: dict, tol: float, what: str, per_tensor_tol: float | None = None
) -> float:
    """Whole-model relative error ≤ tol and every tensor ≤ per_tensor_tol (default tol).

    Returns the whole-model relative error (for reports)."""
    assert got.keys() == want.keys(), f"{what}: keys differ: {set(got) ^ set(want)}"
    worst = max(((rel_err(got[k], want[k]), k) for k in want), key=lambda x: x[0])
    limit = tol if per_tensor_tol is None else per_tensor_tol
    assert worst[0] <= limit, f"{what}: {worst[1]} relative error {worst[0]:.3e} > {limit}"
    flat_g = torch.cat([got[k].double().flatten() for k in sorted(want)])
    flat_w = torch.cat([want[k].double().flatten() for k in sorted(want)])
    whole = rel_err(flat_g, flat_w)
    assert whole <= tol, f"{what}: whole-model relative error {whole:.3e} > {tol}"
    return whole


TOL = 1e-5


def _abs_tol(key: str, m: dict[str, float]) -> float:
    """Absolute tolerance propagated from the 1e-5 bound on the log-prob sums.

    Rewards, margins and the preference loss are functions of β·(differences of log-prob sums of
    ~10² nats each): fp32 cancellation makes their error relative to the sums, not to the small
    difference (|d pref/dΔ| ≤ 1 for sigmoid). The log-prob sums themselves are held to 1e-5
    relative, and the formulas on top of them are unit-tested exactly in test_loss.py.
    """
    scale = TOL * HYPER["beta"] * sum(abs(v) for k, v in m.items() if k.startswith("logps/"))
    if key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "pref_loss"):
        return scale
    if key == "loss":
        return 1e-6 + HYPER["lam"] * scale
    return 1e-6


def assert_matches_reference(results: list[dict], dataset, name: str) -> dict:
    """Reference scores, loss, every metric, grad-norm, step-1 gradients and final weights of
    a ``parity_worker`` run equal the reference replay (fp32, 1e-5); returns the logging
    rank's result."""
    r0 = results[0]
    logged = [r for r in results if r["logging_rank"]][0]
    table, history, grads1, final = replay(r0["init"], dataset, r0["batches"], STEPS)

    assert rel_err(r0["ref_table"], table) <= TOL, "reference scores differ"
    for step, ((loss, metrics, norm), got) in enumerate(zip(history, logged["history"])):
        assert got["loss"] == pytest.approx(loss, rel=TOL, abs=_abs_tol("loss", metrics)), (
            f"step {step} loss"
        )
        for key, want in metrics.items():
            assert got[key] == pytest.approx(want, rel=TOL, abs=_abs_tol(key, metrics)), (
                f"step {step} {key}"
            )
        assert got["grad_norm"] == pytest.approx(norm, rel=TOL), f"step {step} grad_norm"
    assert_tensors_close(r0["grads1"], grads1, TOL, f"{name} step-1 gradients")
    # Adam divides by √v, so elements whose gradients sit at fp32 noise level (~1e-8) move by
    # noise-amplified amounts; after 3 steps a few tensors differ by ~2e-5 of their norm (measured:
    # DP/TP ≤ 2e-5, PP ≤ 2.3e-5 with adam_eps=1e-6; 1.4e-4 with eps=1e-8). The model as a whole
    # must stay within 1e-5, and no tensor beyond 1e-4.
    assert_tensors_close(r0["final"], final, TOL, f"{name} weights after {STEPS} steps", 1e-4)
    return logged
