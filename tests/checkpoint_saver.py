"""Save checkpoints in a loop (the subject of the kill -9 atomicity test).

    python tests/checkpoint_saver.py ROOT CHILDREN COUNT [sync|async]

Imports once, then forks CHILDREN saver processes one after another (each prints ``child <pid>``,
starts its own 1-rank gloo group and continues after ``ROOT/latest``); the test kills each with
SIGKILL mid-save.
The last child saves COUNT checkpoints and exits 0 (so does the parent). Step ``s`` fills every
parameter and AdamW state tensor with ``s`` and saves ``train_state.step = s``, so a loaded
checkpoint is consistent exactly when all its tensors equal its step. Each save is wrapped in
``begin s`` / ``saved s <seconds>`` lines (flushed). ``keep_last=2``. In ``async`` mode each save
goes through an :class:`AsyncCheckpointWriter`: the parameters are overwritten with garbage
right after scheduling (training moving on) and the save is then waited for, so a kill lands
inside the background write.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

KEEP_LAST = 2
MODEL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4)


def _setup():
    from longpo_megatron import distributed
    from longpo_megatron.config import ModelConfig, OptimConfig
    from longpo_megatron.model.gpt import ModelLayout, build_model
    from longpo_megatron.schedule.engine import CpuEngine

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(key, None)  # a 1-rank group on a free port
    distributed.init_process_group("gloo", 5)
    groups = distributed.init_model_parallel(1, 1, 1)
    layout = ModelLayout(1, 1, 1, False, "local", "cpu", "fp32")
    model = build_model(ModelConfig(**MODEL), layout, groups)
    engine = CpuEngine(model, groups, OptimConfig())
    for p in engine.params:  # one real step so AdamW has state
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    return model, engine, groups


def _fill(engine, value: float) -> None:
    with torch.no_grad():
        for p in engine.params:
            p.fill_(value)
            for key in ("exp_avg", "exp_avg_sq"):
                engine.optimizer.state[p][key].fill_(value)


def _save_loop(root: Path, model, engine, groups, count: int, mode: str) -> None:
    """Save consecutive steps after ``latest``: ``count`` of them (0 = until killed)."""
    from longpo_megatron import checkpoint

    writer = checkpoint.AsyncCheckpointWriter(gpu=False) if mode == "async" else None
    steps = checkpoint.complete_steps(root)
    step = (steps[-1] + 1) if steps else 1
    done = 0
    while count == 0 or done < count:
        _fill(engine, float(step))
        print(f"begin {step}", flush=True)
        t0 = time.perf_counter()
        train_state = {"step": step, "consumed_pairs": step, "sampler": {}}
        checkpoint.save(
            root, step, model, groups, optimizer=engine.optimizer, train_state=train_state,
            keep_last=KEEP_LAST, async_writer=writer,
        )  # fmt: skip
        if writer is not None:
            _fill(engine, -1.0)  # the snapshot, not the live tensors, must be written
            writer.wait()
        print(f"saved {step} {time.perf_counter() - t0:.4f}", flush=True)
        step += 1
        done += 1


def main() -> int:
    root, children, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "sync"
    import longpo_megatron.checkpoint  # noqa: F401  (import once; children only build and save)
    import longpo_megatron.model.gpt  # noqa: F401
    import longpo_megatron.schedule.engine  # noqa: F401

    for i in range(children):
        last = i == children - 1
        pid = os.fork()
        if pid == 0:
            print(f"child {os.getpid()}", flush=True)
            _save_loop(root, *_setup(), count if last else 0, mode)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"child {pid} ended {status}", flush=True)
        if last and status != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
