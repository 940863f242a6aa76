"""The demo's starting model: its domain (world.py) keeps the contract, the shipped model loads,
converts and verifies, a corrupted copy is refused, and a tiny pretrain writes every artifact
deterministically."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from longpo_megatron.data.tokenizer import HFChatTokenizer, render_chat
from longpo_megatron.datagen.chunking import chunk_document
from longpo_megatron.datagen.prompts import parse_questions
from longpo_megatron.demo import pretrain, world
from longpo_megatron.eval.tasks import LOOKUP_KEYS, TaskOptions, generate

MODEL = pretrain.DEFAULT_OUT
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok() -> HFChatTokenizer:
    return HFChatTokenizer(MODEL)


def count_of(tok: HFChatTokenizer):
    return lambda text: len(tok.encode(text))


def facts_in(text: str) -> list[tuple[str, str]]:
    return list(world.parse_facts(text).items())


def test_long_documents_keep_the_contract(tok: HFChatTokenizer) -> None:
    count = count_of(tok)
    tokens = world.LONG_FACTOR * world.SHORT_CONTEXT
    docs = world.long_documents(3, tokens, seed=5, count=count)
    assert docs == world.long_documents(3, tokens, seed=5, count=count)
    assert docs != world.long_documents(3, tokens, seed=6, count=count)
    assert len(set(docs)) == 3
    lo, hi = world.chunk_tokens()
    for doc in docs:
        assert count(doc) >= tokens
        keys = [k for k, _ in facts_in(doc)]
        assert len(keys) == len(set(keys)) and set(keys) <= set(LOOKUP_KEYS)
        assert doc == doc.strip() and "\n\n" in doc  # paragraphs: datagen's chunk boundaries
        chunks, stats = chunk_document(doc, count, lo, hi)
        assert chunks and stats.hard_cuts == 0
        for c in chunks:
            assert lo <= c.n_tokens <= hi
            assert len(facts_in(doc[c.start : c.end])) >= world.NUM_QUESTIONS
    with pytest.raises(world.WorldError, match="distinct keys"):
        world.long_documents(1, 100 * tokens, seed=0, count=count)


def test_keys_and_values_are_single_tokens(tok: HFChatTokenizer) -> None:
    words = [f" {k}" for k in LOOKUP_KEYS] + [f" {v}" for v in world.all_values()]
    assert all(len(tok.encode(w)) == 1 for w in words)
    assert tok.vocab_size % 64 == 0


def test_training_dialogues_match_what_datagen_and_eval_ask(tok: HFChatTokenizer) -> None:
    """Question-writing targets parse with datagen's parser; answer turns are the eval task's
    prompts (context + blank line + question) and the fact's sentence (its value the very token
    of the context); recitations repeat their context exactly."""
    rng = random.Random(0)
    kinds = Counter()
    for _ in range(300):
        pairs = world.training_dialogue(rng, rng.randint(3, 12), 4, copy=0.2, recite=0.1)
        first_user, first_answer = pairs[0]
        facts = dict(facts_in(first_user))
        if first_user.endswith("questions about the text above."):
            kinds["write"] += 1
            parsed = parse_questions(first_answer, world.NUM_QUESTIONS)
            assert parsed.reason is None
            assert [q.split()[-1].rstrip("?") in facts for q in parsed.questions] == [True] * 3
        elif first_user.endswith(world.RECITE_REQUEST):
            kinds["recite" if facts else "copy"] += 1
            assert first_user == f"{first_answer}\n\n{world.RECITE_REQUEST}" and len(pairs) == 1
            words = first_answer.split()
            if not facts:
                assert world.COPY_WORDS[0] <= len(words) <= world.COPY_WORDS[1]
                assert set(words) <= set(LOOKUP_KEYS) | set(world.all_values())
        else:
            kinds["answer"] += 1
            context, question = first_user.rsplit("\n\n", 1)
            key = question.split()[-1].rstrip("?")
            assert first_answer == f" {key} {facts[key]}"
            assert tok.encode(first_answer) == tok.encode(f" {key}") + tok.encode(f" {facts[key]}")
        for question, answer in pairs[1:]:
            key = question.split()[-1].rstrip("?")
            assert answer == world.Fact(key, facts[key]).answer
    assert kinds["write"] > 20 and kinds["answer"] > 100
    assert 40 < kinds["copy"] < 80 and 15 < kinds["recite"] < 45
    sample = generate("lookup", 100, 0.5, 0, 0, count_of(tok), TaskOptions(value_digits=2))
    key = sample.question.split()[-1].rstrip("?")
    assert sample.question == world.Fact(key, "10").question  # longpo-eval asks the same
    assert dict(facts_in(sample.context))[key] == sample.answers[0]


def test_renderer_equals_the_chat_template(tok: HFChatTokenizer) -> None:
    """pretrain's fast renderer produces exactly render_chat's ids and response mask."""
    from transformers import AutoTokenizer

    renderer = pretrain.Renderer(AutoTokenizer.from_pretrained(str(MODEL)))
    rng = random.Random(1)
    for _ in range(20):
        pairs = world.training_dialogue(rng, rng.randint(2, 6), 3)
        ids, mask = renderer.render(pairs, 10_000)
        assert (ids, mask) == tuple(render_chat(tok, pairs))
        short = renderer.render(pairs, world.SHORT_CONTEXT)
        assert short is None or len(short[0]) <= world.SHORT_CONTEXT


@pytest.fixture
def eval_config_store():
    """``longpo-eval`` composed in this process, as in its own: other test modules registered the
    training schemas (config group ``model`` …) in Hydra's process-global ConfigStore, which would
    turn eval's ``model=<path>`` value into a group choice. They are hidden during the test."""
    from hydra.core.config_store import ConfigStore

    from longpo_megatron.config import GROUPS

    repo = ConfigStore.instance().repo
    hidden = {g: repo.pop(g) for g in GROUPS if g in repo}
    yield
    repo.update(hidden)


def test_overrides_compose_and_validate(eval_config_store) -> None:
    from hydra import compose, initialize_config_dir

    from longpo_megatron.datagen.cli import CONF_DIR as DATAGEN_CONF
    from longpo_megatron.datagen.config import (
        register_datagen_configs,
        to_datagen_config,
        validate_datagen_config,
    )
    from longpo_megatron.eval.cli import CONF_DIR as EVAL_CONF
    from longpo_megatron.eval.config import (
        register_eval_configs,
        to_eval_config,
        validate_eval_config,
    )

    register_datagen_configs()
    with initialize_config_dir(config_dir=str(DATAGEN_CONF), version_base="1.3"):
        over = [*world.datagen_overrides(), f"backend.model={MODEL}"]
        dg = to_datagen_config(compose(config_name="datagen", overrides=over))
    validate_datagen_config(dg)
    assert dg.instructions.template == world.QUESTION_TEMPLATE
    assert (dg.chunking.min_tokens, dg.chunking.max_tokens) == world.chunk_tokens()
    register_eval_configs()
    with initialize_config_dir(config_dir=str(EVAL_CONF), version_base="1.3"):
        over = [*world.eval_overrides(), f"model={MODEL}"]
        ev = to_eval_config(compose(config_name="eval", overrides=over))
    validate_eval_config(ev)
    assert ev.tasks == ["lookup"] and ev.options.value_digits == world.VALUE_DIGITS


def test_shipped_model_loads_converts_and_verifies() -> None:
    from transformers import AutoModelForCausalLM

    from longpo_megatron.export.arch import model_config_from_hf

    pretrain.verify(MODEL)
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["sliding_window"] is None
    m = model_config_from_hf(config)
    assert m.num_layers == config["num_hidden_layers"]
    model = AutoModelForCausalLM.from_pretrained(str(MODEL))
    assert model.config.vocab_size == HFChatTokenizer(MODEL).vocab_size
    for name in ("recipe.json", "train_log.jsonl", "accuracy.json"):
        assert (MODEL / name).is_file()
    acc = json.loads((MODEL / "accuracy.json").read_text())["lookup"]
    assert {"short_accuracy", "long_accuracy", "short_length", "long_length"} <= set(acc)
    assert acc["long_length"] >= world.LONG_FACTOR * world.SHORT_CONTEXT


def test_shipped_model_knows_the_short_skill_only() -> None:
    """What the demo needs of its starting model, from its own measurements: the lookup found
    within the trained length (held-out, and greedy through longpo-eval at the shallow depths),
    questions it can write, and the long length not solved already."""
    acc = json.loads((MODEL / "accuracy.json").read_text())
    last = json.loads((MODEL / "train_log.jsonl").read_text().splitlines()[-1])
    recipe = json.loads((MODEL / "recipe.json").read_text())["recipe"]
    assert last[f"lookup_acc_{recipe['max_facts']}_facts"] >= 0.9
    short = [c for c in acc["lookup"]["cells"] if c["length"] == acc["lookup"]["short_length"]]
    assert min(c["accuracy"]["contains"] for c in short if c["depth"] <= 0.5) >= 0.8
    assert acc["lookup"]["long_accuracy"] <= acc["lookup"]["short_accuracy"] - 0.3
    assert acc["questions"]["parse_ok"] >= 0.5


def test_corrupted_or_missing_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(MODEL, copy)
    pretrain.verify(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(pretrain.ModelChecksumError, match="model.safetensors"):
        pretrain.verify(copy)
    shutil.copy(MODEL / "model.safetensors", weights)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(pretrain.ModelChecksumError, match=r"tokenizer\.json: missing"):
        pretrain.verify(copy)
    (copy / pretrain.SUMS).unlink()
    with pytest.raises(pretrain.ModelChecksumError, match="SHA256SUMS: missing"):
        pretrain.verify(copy)


TINY = [
    "--steps", "6", "--stop-at", "3", "--eval-every", "2", "--batch-size", "4",
    "--hidden-size", "32", "--intermediate-size", "64", "--num-heads", "2", "--num-kv-heads", "2",
    "--max-facts", "6",
    "--eval-samples", "1", "--question-chunks", "2", "--threads", "1",
]  # fmt: skip


def test_tiny_pretrain_writes_every_artifact_deterministically(
    tmp_path: Path, eval_config_store
) -> None:
    assert pretrain.main([*TINY, "--out", str(tmp_path / "a")]) == 0
    out = tmp_path / "a"
    pretrain.verify(out)
    names = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"}
    assert expected | {"train_log.jsonl", "accuracy.json", "SHA256SUMS"} <= names
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3] and "lookup_acc_6_facts" in log[-1]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["recipe"]["steps"] == 6 and recipe["steps_done"] == 3  # stopped by --stop-at
    acc = json.loads((out / "accuracy.json").read_text())
    assert 0 <= acc["lookup"]["short_accuracy"] <= 1 and acc["questions"]["chunks"] == 2
    assert not (tmp_path / "a.partial").exists()
    assert pretrain.main([*TINY, "--out", str(tmp_path / "b"), "--no-measure"]) == 0
    same = pretrain.sha256(tmp_path / "b" / "model.safetensors")
    assert same == pretrain.sha256(out / "model.safetensors")


def test_bad_flag_is_one_error_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "longpo_megatron.demo.pretrain", "--steps", "0"]
    cmd += ["--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--steps" in proc.stderr and "Traceback" not in proc.stderr
    bad = r"--copy-fraction \+ --recite-fraction = 1\.1"
    with pytest.raises(pretrain.PretrainError, match=bad):
        pretrain.parse_args(["--copy-fraction", "0.9", "--recite-fraction", "0.2"])
    with pytest.raises(pretrain.PretrainError, match="--copy-warmup-fraction = -0.1"):
        pretrain.parse_args(["--copy-warmup-fraction", "-0.1"])


def test_copy_warm_up_then_the_mix() -> None:
    """The first copy_warmup_steps batches are (nearly) all copies; then the recipe's mix."""
    recipe = pretrain.Recipe(copy_warmup_steps=5, copy_warmup_fraction=0.9)
    assert pretrain.mix_at(recipe, 4) == (0.9, 0.0)
    assert pretrain.mix_at(recipe, 5) == (recipe.copy_fraction, recipe.recite_fraction)
    rng = random.Random(0)
    warm = [world.training_dialogue(rng, 4, 3, True, 0.9, 0.0) for _ in range(400)]
    copies = sum(p[0][0].endswith(world.RECITE_REQUEST) and not facts_in(p[0][0]) for p in warm)
    assert 330 < copies < 390
