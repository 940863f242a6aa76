"""What a run leaves for its users: W&B resumed with the checkpointed run id, the resolved config,
one log file per start, ``valid/*`` tags, and the console line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longpo_megatron import checkpoint
from longpo_megatron.config import LoggingConfig
from longpo_megatron.metrics import MetricsLogger, RunLog, format_duration

ROOT = Path(__file__).resolve().parent.parent
FAKE_WANDB = '''
import json, os
class _Run:
    def log(self, values, step):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(json.dumps({"step": step, "keys": sorted(values)}) + "\\n")
    def finish(self):
        pass
def init(**kw):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"init": {k: kw.get(k) for k in ("project", "id", "resume")}}) + "\\n")
    return _Run()
'''


def _train(tmp: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LONGPO_ROOT=str(ROOT), FAKE_WANDB_LOG=str(tmp / "wandb.log"))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp / "fake"), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "longpo_megatron.train", "parallel.engine=cpu", f"data.path={data}",
        "train.global_batch_size=2", f"checkpoint.save={tmp / 'ckpt'}",
        f"logging.output_dir={tmp / 'out'}", "logging.tensorboard=false",
        "logging.wandb_project=proj", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


@pytest.mark.timeout(300)
def test_wandb_resumes_the_checkpointed_run(tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join((ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:2]))
    first = _train(tmp_path, data, "train.train_iters=2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run_id = checkpoint.read_common(checkpoint.resolve(tmp_path / "ckpt"))["train_state"]
    run_id = run_id["wandb_run_id"]
    assert len(run_id) == 8
    load = f"checkpoint.load={tmp_path / 'ckpt'}"
    second = _train(tmp_path, data, "train.train_iters=3", load)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    events = [json.loads(x) for x in (tmp_path / "wandb.log").read_text().splitlines()]
    inits = [e["init"] for e in events if "init" in e]
    assert inits == [{"project": "proj", "id": run_id, "resume": "allow"}] * 2
    assert [e["step"] for e in events if "step" in e] == [1, 2, 3]
    assert "train/loss" in events[1]["keys"] and "train/mfu" not in events[1]["keys"]  # CPU
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "wandb_project: proj" in saved and "train_iters: 3" in saved  # the latest start's


def test_logger_tags_console_and_config(tmp_path, capsys):
    cfg = LoggingConfig(output_dir=str(tmp_path), tensorboard=False)
    logger = MetricsLogger(cfg, True, {"train": {"seed": 1}})
    logger.log(3, {"loss": 1.5, "valid/loss": 2.0, "eta_s": 3725.0, "tflops_per_gpu": 1.25})
    logger.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("step      3 | loss 1.5000") and "TFLOP/s/gpu 1.25" in line
    assert "valid loss 2.0000" in line and line.endswith("eta 1:02:05")
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["valid/loss"] == 2.0
    assert (tmp_path / "config.yaml").read_text() == "train:\n  seed: 1\n"
    assert format_duration(59.6) == "0:01:00"


def test_run_log_one_file_per_start(tmp_path):
    before = sys.stdout
    for n in range(2):
        log = RunLog(str(tmp_path))
        print(f"hello {n}")
        log.close()
        assert sys.stdout is before
    files = sorted((tmp_path / "logs").iterdir())
    assert [f.name for f in files] == ["run-000.log", "run-001.log"]
    assert files[1].read_text().splitlines()[1:] == ["hello 1"]
