"""The multi-process harness: results, fast failure with tracebacks, timeouts, no leftovers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.distributed as dist
from dist_harness import init_gloo, run_distributed

pytestmark = pytest.mark.distributed


# ---- rank functions (top level, so spawn can import them) ----------------------------------
def _allreduce(rank: int, world_size: int, *, scale: float) -> dict:
    init_gloo()
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)
    return {
        "rank": rank,
        "sum": float(t.item()),
        "pid": os.getpid(),
        "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
        "threads": torch.get_num_threads(),
        "tensor": t,
    }


def _one_rank_raises(rank: int, world_size: int, *, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    init_gloo()
    if rank == 1:
        raise RuntimeError("boom from rank one")
    dist.barrier()  # rank 0 would wait here forever without the harness
    time.sleep(600)


def _one_rank_hangs(rank: int, world_size: int, *, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    init_gloo()
    if rank == 1:
        child = subprocess.Popen(["sleep", "1000"])  # a grandchild that must die too
        Path(pid_dir, "grandchild.pid").write_text(str(child.pid))
        print("rank one is about to hang", flush=True)
        time.sleep(1000)
    dist.barrier()


def _exits_without_raising(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    return None


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once ``pid`` no longer exists as a child of ours (orphans reaped by init count)."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid():
                return True  # an orphan zombie awaiting its (non-us) reaper; not our leak
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _no_children_left() -> bool:
    """No child processes remain, except multiprocessing's long-lived resource tracker."""
    left = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                left.append(child)
        except psutil.NoSuchProcess:
            pass
    return not left


# ---- tests ---------------------------------------------------------------------------------
def test_two_rank_allreduce_results_in_rank_order() -> None:
    out = run_distributed(_allreduce, 2, timeout_s=120, scale=2.0)
    assert [o["rank"] for o in out] == [0, 1]
    assert [o["sum"] for o in out] == [6.0, 6.0]
    assert all(torch.equal(o["tensor"], torch.tensor([6.0])) for o in out)
    assert [o["env"]["RANK"] for o in out] == ["0", "1"]
    assert all(
        o["env"]["WORLD_SIZE"] == "2" and o["env"]["MASTER_ADDR"] == "127.0.0.1" for o in out
    )
    assert [o["env"]["LOCAL_RANK"] for o in out] == ["0", "1"]
    assert all(o["threads"] == 1 for o in out)
    assert all(_gone(o["pid"]) for o in out)
    assert _no_children_left()


def test_failing_rank_fails_fast_with_traceback(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_one_rank_raises, 2, timeout_s=120, pid_dir=str(tmp_path))
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert elapsed < 60, elapsed
    # Rank 0 is either killed by the harness or fails on its own (gloo sees the peer vanish).
    assert "rank(s) [1] failed" in msg or "rank(s) [0, 1] failed" in msg
    assert "first rank to raise: rank 1" in msg
    assert "boom from rank one" in msg and "RuntimeError" in msg
    assert "_one_rank_raises" in msg  # the traceback, not just the message
    assert "===== rank 0: " in msg and "===== rank 1: exit code 1" in msg
    for r in (0, 1):
        assert _gone(int((tmp_path / f"{r}.pid").read_text()))
    assert _no_children_left()


def test_hanging_rank_is_killed_at_timeout(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_one_rank_hangs, 2, timeout_s=20, pid_dir=str(tmp_path))
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert 15 <= elapsed < 40, elapsed
    # faulthandler dumps each rank's stack at the deadline: we see where each one hung.
    assert "timeout after" in msg
    assert "rank one is about to hang" in msg
    assert "_one_rank_hangs" in msg
    assert "Thread" in msg or "Stack" in msg or "Timeout" in msg
    for name in ("0.pid", "1.pid", "grandchild.pid"):
        assert _gone(int((tmp_path / name).read_text())), name
    assert _no_children_left()


def test_rank_dying_without_exception_is_reported() -> None:
    with pytest.raises(AssertionError, match=r"rank 0: exit code 3"):
        run_distributed(_exits_without_raising, 2, timeout_s=60)
    assert _no_children_left()


def test_rejects_local_functions() -> None:
    def local(rank: int, world_size: int) -> None:
        return None

    with pytest.raises(ValueError, match="top-level"):
        run_distributed(local, 1)


# ---- gather.py against megatron-core's own checkpoint metadata --------------------------------
_NUM_LAYERS = 4


def _megatron_stage(tp: int, pp: int, tied: bool):
    """This rank's GPTModel stage (megatron's local spec, CPU init) and its process groups."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    init_gloo()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    cfg = TransformerConfig(
        num_layers=_NUM_LAYERS,
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=12,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    torch.manual_seed(1 + 100 * ps.get_pipeline_model_parallel_rank())
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=64,
        max_sequence_length=64,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    groups = SimpleNamespace(
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        cp=ps.get_context_parallel_group(),
    )
    return model, groups, ps


def _megatron_pieces(model: torch.nn.Module) -> list[tuple]:
    """(key, global_shape, global_offset, data) of every ShardedTensor megatron would save."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    pieces = []
    for value in model.sharded_state_dict().values():
        if isinstance(value, ShardedTensorFactory):
            value = value.build()
        for st in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(st, ShardedTensor):
                pieces.append(
                    (st.key, tuple(st.global_shape), tuple(st.global_offset), st.data.clone())
                )
    return pieces


def _gather_rank(rank: int, world_size: int, *, tp: int, pp: int, tied: bool) -> dict:
    from gather import gather_full_state

    model, groups, ps = _megatron_stage(tp, pp, tied)
    dp_rank = ps.get_data_parallel_rank()
    if dp_rank != 0:  # other DP replicas must be ignored by the gather
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1000.0)
    pieces = _megatron_pieces(model) if dp_rank == 0 else []
    for p in model.parameters():  # megatron DDP style: .main_grad set, .grad None
        p.main_grad = p.detach() * 2.0 + 1.0
    full = gather_full_state(model, groups, num_layers=_NUM_LAYERS)
    full_grads = gather_full_state(model, groups, grads=True, num_layers=_NUM_LAYERS)
    ps.destroy_model_parallel()
    return {"pieces": pieces, "full": full, "grads": full_grads}


_SD_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _truth_from_pieces(pieces: list[tuple]) -> dict[str, torch.Tensor]:
    """Assemble full tensors from megatron's sharding metadata (layer-stacked keys unstacked)."""
    bufs: dict[str, torch.Tensor] = {}
    for key, gshape, goff, data in pieces:
        buf = bufs.setdefault(key, torch.full(gshape, float("nan")))
        lead = len(gshape) - data.ndim  # prepended axes (the stacked layer index)
        index = tuple(goff[:lead]) + tuple(slice(o, o + n) for o, n in zip(goff[lead:], data.shape))
        buf[index] = data
    truth: dict[str, torch.Tensor] = {}
    for key, buf in bufs.items():
        assert not torch.isnan(buf).any(), f"{key} not fully covered by megatron's shards"
        if key.startswith("decoder.layers."):
            suffix = key[len("decoder.layers.") :]
            suffix = _SD_ALIASES.get(suffix, suffix)
            assert buf.shape[0] == _NUM_LAYERS
            for i in range(_NUM_LAYERS):
                truth[f"decoder.layers.{i}.{suffix}"] = buf[i]
        else:
            truth[key] = buf
    return truth


@pytest.mark.parametrize(
    "tp,pp,tied",
    [(2, 2, False), (2, 1, True)],  # world 4: TP2×PP2, and TP2×DP2 (tied, DP replica ignored)
    ids=["tp2pp2", "tp2dp2-tied"],
)
def test_gather_full_state_matches_megatron_sharding(tp: int, pp: int, tied: bool) -> None:
    out = run_distributed(_gather_rank, 4, timeout_s=180, tp=tp, pp=pp, tied=tied)
    assert all(o["full"] is None and o["grads"] is None for o in out[1:])
    truth = _truth_from_pieces([p for o in out for p in o["pieces"]])
    full, grads = out[0]["full"], out[0]["grads"]
    assert sorted(full) == sorted(truth)
    assert ("output_layer.weight" in full) is not tied
    assert full["decoder.layers.3.mlp.linear_fc1.weight"].shape == (96, 32)
    assert full["decoder.layers.3.self_attention.linear_qkv.weight"].shape == (2 * 4 * 12, 32)
    for name, want in truth.items():
        assert torch.equal(full[name], want), name
        assert torch.equal(grads[name], want * 2.0 + 1.0), name
