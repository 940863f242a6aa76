"""End to end through the real ``hf`` backend: a tiny Llama trained HERE on a few hundred needle
examples finds the needle far above chance; the same model untrained stays at chance. This is
what shows the harness can fail.

The task is made tiny on purpose: one-digit magic numbers (the only digit in the context), a
600-token BPE vocabulary, prompts of ~100 tokens. Training takes ~20 s on one CPU thread.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from longpo_megatron.data.tokenizer import HFChatTokenizer
from longpo_megatron.datagen.tiny_model import make_tiny_tokenizer
from longpo_megatron.eval.cli import run
from longpo_megatron.eval.config import EvalConfig
from longpo_megatron.eval.render import answer_row, template_overhead, token_counter
from longpo_megatron.eval.tasks import TaskOptions, _filler, generate

transformers = pytest.importorskip("transformers")

OPTIONS = TaskOptions(value_digits=1, num_choices=4)
TRAIN_SEED, EVAL_SEED = 101, 0
"""Training and evaluation samples come from different seeds (no sample is seen twice)."""


def _train_rows(tok: HFChatTokenizer, n: int) -> list[tuple[list[int], list[bool]]]:
    rng = random.Random(0)
    count, overhead = token_counter(tok), template_overhead(tok)
    rows = []
    for i in range(n):
        length, depth = rng.choice([64, 96, 128]), rng.random()
        s = generate("niah_single", length - overhead, depth, i, TRAIN_SEED, count, OPTIONS)
        rows.append(answer_row(tok, s.prompt, s.target))
    return rows


def _batch(rows, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    for i, (row, mask) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.where(torch.tensor(mask), torch.tensor(row), -100)
    return ids, labels


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """``random`` and ``trained``: the same tiny Llama before and after 300 steps."""
    base = tmp_path_factory.mktemp("e2e")
    rng = random.Random(0)
    texts = [" ".join(_filler(rng) for _ in range(50)) for _ in range(20)]
    words = lambda t: len(t.split())  # noqa: E731
    texts += [generate("niah_single", 200, 0.5, i, 99, words).prompt for i in range(20)]
    out = {}
    for name in ("random", "trained"):
        out[name] = make_tiny_tokenizer(base / name, texts, vocab_size=600)
    tok = HFChatTokenizer(out["trained"])
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out["random"])
    rows = _train_rows(tok, 400)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        ids, labels = _batch(rng.sample(rows, 16), tok.pad_id)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert float(loss.detach()) < 1.0, f"training did not converge (loss {float(loss):.3f})"
    model.save_pretrained(out["trained"])
    return out


def _evaluate(model: Path, mode: str, out: Path) -> dict[str, float]:
    cfg = EvalConfig(model=str(model), mode=mode, tasks=["niah_single"], lengths=[96, 128])
    cfg.depths, cfg.samples, cfg.seed = [0.0, 0.5, 1.0], 20, EVAL_SEED
    cfg.options, cfg.max_new_tokens, cfg.output_dir = OPTIONS, 4, str(out)
    cfg.backend.device, cfg.backend.dtype = "cpu", "float32"
    result = run(cfg)
    n = sum(c["n"] for c in result["cells"])
    metrics = result["cells"][0]["accuracy"]
    return {m: sum(c["accuracy"][m] * c["n"] for c in result["cells"]) / n for m in metrics}


def test_trained_model_finds_the_needle(models: dict[str, Path], tmp_path: Path) -> None:
    choice = _evaluate(models["trained"], "loglik", tmp_path / "ll")
    greedy = _evaluate(models["trained"], "generate", tmp_path / "gen")
    print(f"trained: {choice} {greedy}")
    assert choice["choice"] >= 0.8  # chance 0.25 (4 options)
    assert greedy["exact"] >= 0.7 and greedy["contains"] >= 0.7  # chance ~0.1 (10 digits)
    assert (tmp_path / "gen" / "results.png").is_file()


def test_random_model_is_at_chance(models: dict[str, Path], tmp_path: Path) -> None:
    choice = _evaluate(models["random"], "loglik", tmp_path / "ll")
    print(f"random: {choice}")
    # 120 four-way questions: chance 0.25, binomial sd 0.04
    assert 0.12 <= choice["choice"] <= 0.4
    assert choice["greedy"] <= 0.1  # greedy decoding would not write the digit + end of turn
