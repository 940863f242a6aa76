"""Scoring on hand-made outputs, aggregation, result files, table, heat-map, comparison, config
validation and the command line's error reporting."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from longpo_megatron.data.tokenizer import ByteChatTokenizer
from longpo_megatron.eval.backends import EvalConfigError
from longpo_megatron.eval.cli import run
from longpo_megatron.eval.config import EvalConfig, validate_eval_config
from longpo_megatron.eval.report import (
    ResultFileError,
    compare_table,
    console_table,
    load_results,
)
from longpo_megatron.eval.scoring import aggregate, score_choices, score_output
from longpo_megatron.eval.tasks import Sample, TaskError

ROOT = Path(__file__).resolve().parents[2]


def sample(*answers: str, choices: tuple[str, ...] = (), label: int = -1) -> Sample:
    return Sample("t", 100, 0.5, 0, "ctx", "q?", tuple(answers), choices, label)


@pytest.mark.parametrize(
    "output,contains,exact",
    [
        ("7203499", 1, 1),
        (" 7203499.\n", 1, 1),
        ("The special magic number is 7203499.", 1, 0),
        ("720349", 0, 0),
        ("7203498", 0, 0),
        ("", 0, 0),
    ],
)
def test_single_answer(output: str, contains: int, exact: int) -> None:
    assert score_output(sample("7203499"), output) == {"contains": contains, "exact": exact}


@pytest.mark.parametrize(
    "output,contains,exact",
    [
        ("ABCDE, FGHIJ", 1, 1),
        ("fghij abcde", 1, 1),  # order and case free
        ("The variables are ABCDE and FGHIJ.", 1, 0),
        ("ABCDE", 0, 0),
        ("ABCDE, FGHIJ, KLMNO", 1, 0),
    ],
)
def test_all_answers(output: str, contains: int, exact: int) -> None:
    assert score_output(sample("ABCDE", "FGHIJ"), output) == {"contains": contains, "exact": exact}


def test_choices() -> None:
    s = sample("b", choices=("a", "b", "c"), label=1)
    assert score_choices(s, [-3.0, -1.0, -2.0], True) == {"choice": 1.0, "greedy": 1.0}
    assert score_choices(s, [-0.5, -1.0, -2.0], False) == {"choice": 0.0, "greedy": 0.0}
    assert score_choices(s, [-1.0, -1.0, -2.0], False)["choice"] == 0.0  # a tie is not a win
    with pytest.raises(ValueError, match="2 scores for 3 choices"):
        score_choices(s, [-1.0, -2.0], True)


def test_aggregate() -> None:
    rec = lambda depth, c, e, n: {  # noqa: E731
        "task": "t",
        "length": 64,
        "depth": depth,
        "prompt_tokens": n,
        "scores": {"contains": c, "exact": e},
    }
    cells = aggregate([rec(0.0, 1, 1, 60), rec(0.0, 1, 0, 62), rec(1.0, 0, 0, 64)])
    assert cells == [
        {
            "task": "t",
            "length": 64,
            "depth": 0.0,
            "n": 2,
            "prompt_tokens": 61.0,
            "accuracy": {"contains": 1.0, "exact": 0.5},
        },
        {
            "task": "t",
            "length": 64,
            "depth": 1.0,
            "n": 1,
            "prompt_tokens": 64.0,
            "accuracy": {"contains": 0.0, "exact": 0.0},
        },
    ]


class HalfBlindEvaluator:
    """Hand-made answers: the right number when the needle is in the first half of the prompt,
    a wrong one otherwise; in loglik mode it scores the option with the right number highest."""

    tokenizer = ByteChatTokenizer()

    def describe(self) -> dict:
        return {"backend": "half-blind"}

    @staticmethod
    def _truth(prompt: str) -> tuple[str, float]:
        key = re.search(r"number for ([\w-]+) mentioned", prompt).group(1)
        hit = re.search(rf"numbers for {key} is: (\d+)\.", prompt)
        return hit.group(1), hit.start() / len(prompt.rsplit("\n\n", 1)[0])

    def generate(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            value, where = self._truth(p)
            out.append(f"It is {value}." if where < 0.5 else "It is 1234567.")
        return out

    def loglik(self, rows):
        out = []
        for ids, mask in rows:
            text = self.tokenizer.decode(ids, skip_special=True)
            answer = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special=True)
            value, _ = self._truth(text[: -len(answer)])
            out.append((0.0 if answer == value else -5.0, answer == value))
        return out

    def close(self) -> None:
        pass


def _cfg(tmp_path: Path, **kw) -> EvalConfig:
    cfg = EvalConfig(model="half-blind", tasks=["niah_single"], lengths=[300, 600])
    cfg.depths, cfg.samples, cfg.output_dir = [0.0, 1.0], 3, str(tmp_path)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_run_writes_json_table_and_heatmap(tmp_path: Path, capsys) -> None:
    result = run(_cfg(tmp_path / "gen", name="before"), HalfBlindEvaluator())
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in result["cells"]}
    assert acc == {
        (n, d): {"contains": 1.0 - d, "exact": 0.0} for n in (300, 600) for d in (0.0, 1.0)
    }
    saved = load_results(tmp_path / "gen" / "results.json")
    assert saved["cells"] == result["cells"] and len(saved["samples"]) == 12
    assert all(0 <= s["length"] - s["prompt_tokens"] <= 60 for s in saved["samples"])
    png = (tmp_path / "gen" / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = capsys.readouterr().out
    assert re.search(r"niah_single\s+50\.0\s+50\.0\s+50\.0", table)
    ll = run(_cfg(tmp_path / "ll", mode="loglik", name="ll"), HalfBlindEvaluator())
    assert all(c["accuracy"] == {"choice": 1.0, "greedy": 1.0} for c in ll["cells"])
    assert console_table(ll).splitlines()[0] == "ll: choice accuracy (%), mean over depths"


def test_compare(tmp_path: Path) -> None:
    before = run(_cfg(tmp_path / "a", name="before"), HalfBlindEvaluator())
    after = json.loads(json.dumps(before))
    after["name"] = "after"
    for c in after["cells"]:
        c["accuracy"]["contains"] = 1.0
    (tmp_path / "b.json").write_text(json.dumps(after))
    files = [str(tmp_path / "a" / "results.json"), str(tmp_path / "b.json")]
    text = run(EvalConfig(compare=files, output_dir=str(tmp_path / "c")))["compare"]
    assert re.search(r"niah_single\s+300\s+50\.0\s+100\.0\s+\+50\.0", text)
    assert (tmp_path / "c" / "compare.txt").read_text().strip() == text
    ll = run(_cfg(tmp_path / "ll", mode="loglik"), HalfBlindEvaluator())
    with pytest.raises(ResultFileError, match="different metrics"):
        compare_table([before, ll])


def test_bad_result_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    cases = [
        ("{", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"format": "longpo-eval/1", "name": "x", "metric": "contains"}', "missing key 'cells'"),
        ('{"format": "v0", "name": "x", "metric": "m", "cells": []}', "format 'v0'"),
        (
            '{"format": "longpo-eval/1", "name": "x", "metric": "exact", "cells": '
            '[{"task": "t", "length": 1, "depth": 0, "n": 1, "accuracy": {"contains": 1}}]}',
            r"cells\[0\].accuracy has no 'exact' entry",
        ),
    ]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(ResultFileError, match=f"{bad}: .*{message}"):
            load_results(bad)
    with pytest.raises(ResultFileError, match="cannot read"):
        load_results(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model": None}, "model=None: set an HF directory"),
        ({"mode": "sample"}, "mode='sample': must be one of"),
        ({"tasks": ["niah_single", "ruler"]}, "unknown task 'ruler'"),
        ({"depths": [0.5, 1.5]}, r"depths=\[0.5, 1.5\]: must lie in \[0, 1\]"),
        ({"lengths": [8]}, "every length >= 16"),
        ({"metric": "choice"}, "metric='choice': mode=generate has"),
        ({"compare": ["one.json"]}, "compare=.*two or more"),
    ],
)
def test_config_validation(changes: dict, message: str) -> None:
    cfg = EvalConfig(model="m")
    for k, v in changes.items():
        setattr(cfg, k, v)
    with pytest.raises((EvalConfigError, TaskError), match=message):
        validate_eval_config(cfg)


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=/nonexistent/ckpt"], "checkpoint path '/nonexistent/ckpt' does not exist"),
        (["compare=[/nonexistent/a.json,/nonexistent/b.json]"], "/nonexistent/a.json: cannot read"),
    ],
)
def test_cli_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "longpo_megatron.eval.cli", f"output_dir={tmp_path}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "preset", [None, *sorted(p.stem for p in (ROOT / "conf/eval/preset").glob("*.yaml"))]
)
def test_shipped_yamls_compose_and_validate(preset: str | None) -> None:
    from hydra import compose, initialize_config_dir

    from longpo_megatron.eval.config import register_eval_configs, to_eval_config

    register_eval_configs()
    overrides = ["model=/some/model"] + ([f"preset={preset}"] if preset else [])
    with initialize_config_dir(config_dir=str(ROOT / "conf/eval"), version_base="1.3"):
        cfg = to_eval_config(compose("eval", overrides=overrides))
    validate_eval_config(cfg)
    assert cfg.model == "/some/model" and cfg.backend.model == ""
    with initialize_config_dir(config_dir=str(ROOT / "conf/eval"), version_base="1.3"):
        with pytest.raises(EvalConfigError, match=r"unknown config key\(s\) \['bogus'\]"):
            to_eval_config(compose("eval", overrides=["+bogus=1"]))


def test_hf_directory_without_chat_template(tmp_path: Path) -> None:
    from longpo_megatron.datagen.tiny_model import make_tiny_tokenizer

    model = make_tiny_tokenizer(tmp_path / "m", ["some text to train on"], vocab_size=300)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(EvalConfigError, match=r"model='.*/m' \(HF directory\): .*no chat template"):
        run(EvalConfig(model=str(model), tasks=["niah_single"], output_dir=str(tmp_path)))
