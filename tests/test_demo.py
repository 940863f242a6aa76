"""``longpo-demo run`` (the README's demo): a shortened run end to end, and its refusals.

The end-to-end case runs ``--quick`` (a few documents, steps and samples) on the shipped model
and checks every artifact: the table, the PNG, summary.json's fields and numbers, each
``longpo-eval`` result file, and that the LongPO HF export loads in ``transformers`` with the
raised RoPE θ and runs (HF/Megatron logit parity of exports is tests/test_convert.py's job).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longpo_megatron.demo.loop import DemoConfig, DemoError, Lengths, check_config
from longpo_megatron.demo.report import MODELS, accuracy_by_length, table_text
from longpo_megatron.demo.stages import StageError, StageRunner

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "demo-model"
STAGES = (
    "verify documents datagen merge preprocess convert train-sft train-dpo train-longpo export eval"
).split()


def _demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "longpo_megatron.demo.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_bad_settings_are_one_error_line(tmp_path: Path) -> None:
    res = _demo("run", "--model", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: --model={tmp_path / 'nope'}: no HF model there (config.json); build it with "
        "`longpo-demo pretrain`"
    ]
    res = _demo("frobnicate")
    assert res.returncode == 2 and "unknown command 'frobnicate'" in res.stderr
    res = _demo("run", "--train-iters", "many")
    assert res.returncode == 2 and "--train-iters: invalid int value" in res.stderr
    assert "Traceback" not in res.stderr


def test_checks_name_the_flag(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DemoError, match="--long-factor=4: the demo shows >= 8x"):
        check_config(DemoConfig(model=str(tmp_path), long_factor=4))
    with pytest.raises(DemoError, match="--parallel='tp9': no conf/parallel/tp9.yaml"):
        check_config(DemoConfig(model=str(tmp_path), parallel="tp9"))
    with pytest.raises(DemoError, match="--train-iters=0: must be >= 1"):
        check_config(DemoConfig(model=str(tmp_path), train_iters=0))
    assert Lengths.of(128, 124, 8) == Lengths(128, 124, 1024, 2048, 512)
    with pytest.raises(DemoError, match="short evaluation length 200: must lie in"):
        Lengths.of(128, 200, 8)


def test_non_demo_output_dir_is_never_removed(tmp_path: Path) -> None:
    from longpo_megatron.demo.loop import prepare_out_dir

    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(DemoError, match="not empty"):
        prepare_out_dir(DemoConfig(out_dir=str(out)))
    with pytest.raises(DemoError, match="not a demo output"):
        prepare_out_dir(DemoConfig(out_dir=str(out), overwrite=True))
    assert (out / "precious.txt").read_text() == "keep"


def test_a_failed_stage_stops_with_its_error_line(tmp_path: Path) -> None:
    runner = StageRunner(tmp_path, total=2, heartbeat_s=0.1)
    runner.run("ok", "fine", [[sys.executable, "-c", "print('hello')"]])
    assert "hello" in (tmp_path / "ok.log").read_text() and "ok" in runner.times
    said = "import sys; print('error: data.path=x: no such file', file=sys.stderr); sys.exit(2)"
    slow = "import time; time.sleep(60)"
    with pytest.raises(StageError, match=r"'bad' failed: data.path=x: no such file \(log: "):
        runner.run("bad", "fails", [[sys.executable, "-c", slow], [sys.executable, "-c", said]])
    with pytest.raises(StageError, match=r"'crash' failed: exit code 1; see the end of .*crash"):
        runner.run("crash", "bug", [[sys.executable, "-c", "raise SystemExit(1)"]])


def test_table_is_the_mean_over_tasks_per_length() -> None:
    def result(a: float, b: float) -> dict:
        return {"summary": {"t1": {"256": a, "2048": b}, "t2": {"256": 1.0, "2048": 0.0}}}

    acc = {m: accuracy_by_length(result(0.5, 0.25 * i)) for i, m in enumerate(MODELS)}
    assert acc["base"] == {256: 0.75, 2048: 0.0} and acc["longpo"][2048] == 0.375
    text = table_text(acc, "contains")
    assert "| LongPO | 75.0 | 37.5 | +0.0 | +37.5 |" in text.splitlines()


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="data/demo-model not built")
def test_quick_demo_makes_every_artifact(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = _demo("run", "--quick", "--out-dir", str(out), timeout=1400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for i, stage in enumerate([*STAGES, "report"], start=1):
        assert f"[{i}/{len(STAGES) + 1}] {stage}:" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "longpo-demo/1" and summary["machine"]["cores"] >= 1
    assert set(summary["stage_seconds"]) == set(STAGES)
    assert 0 < summary["demo_seconds"] < sum(summary["stage_seconds"].values()) + 60
    short, long = summary["lengths"]["short"], summary["lengths"]["long"]
    assert long >= 8 * short
    assert summary["rope_theta"]["policy"] > summary["rope_theta"]["reference"]
    for model in MODELS:
        assert set(summary["accuracy"][model]) == {str(short), str(long)}
        assert all(0.0 <= v <= 1.0 for v in summary["accuracy"][model].values())
        result = json.loads((out / "eval" / model / "results.json").read_text())
        assert result["format"] == "longpo-eval/1" and result["name"] == model
        assert {c["length"] for c in result["cells"]} == {short, long}
    for method in MODELS[1:]:
        assert summary["training"][method]["step"] == summary["budget"]["train_iters"]
    assert summary["datagen"]["records"]["records"] >= 1
    table = (out / "table.md").read_text()
    for label in ("| base |", "| SFT |", "| DPO |", "| LongPO |"):
        assert label in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _export_loads_and_runs(out / "hf" / "longpo", summary["rope_theta"]["policy"])


def _export_loads_and_runs(path: Path, theta: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    assert config["rope_theta"] == pytest.approx(theta)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )  # text, then ids: transformers 5 returns a BatchEncoding when it tokenizes here
    ids = tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config["vocab_size"]) and torch.isfinite(logits).all()
