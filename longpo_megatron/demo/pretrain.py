"""``longpo-demo pretrain``: build the demo's short-context starting model from scratch.

A byte-level BPE tokenizer is trained on the domain's text (longpo_megatron/demo/world.py) so
that every key and value is one token; a tiny ``MistralForCausalLM`` (plain RoPE, untied
embeddings) then learns, on dialogues of at most ``world.SHORT_CONTEXT`` tokens, to answer
``What is the code of <key>?`` from a list of facts (several lookups per sequence, loss on the
assistant tokens only) and to write numbered questions about a chunk. A curriculum grows the
number of facts per context; AdamW with warmup and a cosine decay. Held-out lookup accuracy is
logged to ``train_log.jsonl``; at the end ``longpo-eval`` itself measures the ``lookup`` task at
a short and a long (``world.LONG_FACTOR`` x) length, and the question writing is checked with
``longpo-datagen``'s parser (``accuracy.json``). Every file is listed in ``SHA256SUMS``, which
:func:`verify` checks before the demo uses the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from longpo_megatron.demo import world
from longpo_megatron.errors import UserError, report_user_errors

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "data" / "demo-model"
"""Where the shipped model lives (and where ``pretrain`` writes by default)."""
SUMS = "SHA256SUMS"
RESERVED = "<|reserved_{}|>"
"""Unused special tokens that round the vocabulary up to a multiple of 64 (TP-friendly)."""


class ModelChecksumError(UserError, ValueError):
    """A file of the model directory is missing or differs from its SHA256SUMS entry."""


class PretrainError(UserError, ValueError):
    """A pretraining setting that cannot work; the message names the flag."""


@dataclass
class Recipe:
    """Every setting of a pretraining run (stored as recipe.json next to the model)."""

    steps: int = 5000
    """Optimizer steps (the LR schedule and the curriculum are laid out over them)."""
    minutes: Optional[float] = None
    """Wall-clock budget: stop early (after a whole step) when it is spent; null = none."""
    stop_at: Optional[int] = None
    """Stop after this many steps, the schedule still laid out over ``steps`` (rebuilds a run
    that ``minutes`` cut short: pass its recipe.json ``steps_done``); null = ``steps``."""
    seed: int = 0
    """Seeds the weights, the tokenizer corpus and every batch (batch k is a function of it)."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda."""
    threads: int = 1
    """torch CPU threads (a rerun reproduces the weights with the same count)."""
    batch_size: int = 32
    """Dialogues per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (cosine decay)."""
    warmup_steps: int = 100
    """Linear warmup."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = 10000.0
    """Plain RoPE base (the model is never trained past SHORT_CONTEXT positions)."""
    max_position_embeddings: int = 32 * world.SHORT_CONTEXT
    """Declared limit (generation refuses longer prompts); far above what was trained."""
    bpe_vocab_size: int = 2048
    """Vocabulary asked of the BPE trainer (it stops when no merge is left)."""
    tokenizer_dialogues: int = 3000
    """Dialogues of the tokenizer's training corpus."""
    min_facts: int = 2
    """Facts per context at the start of the curriculum."""
    max_facts: int = 12
    """Facts per context at its end (≈ 50 tokens; question turns fill the rest of SHORT_CONTEXT;
    the lookup found by induction carries over to the ≈ 28 facts of the short evaluation)."""
    curriculum_fraction: float = 0.6
    """Share of the steps over which the largest fact count grows from min to max."""
    max_turns: int = 8
    """Question/answer turns per dialogue (as many as fit SHORT_CONTEXT)."""
    repeat_questions: bool = True
    """Ask facts again until max_turns (more lookups per sequence when there are few facts)."""
    copy_fraction: float = 0.3
    """Share of dialogues that repeat random keys and values (world.copy_dialogue): the dense
    copy signal that forms induction heads; without it the lookup stays at chance."""
    recite_fraction: float = 0.15
    """Share of dialogues that repeat a context of facts (world.recite_dialogue): a lookup
    target at every fact."""
    copy_warmup_steps: int = 400
    """First steps in which ``copy_warmup_fraction`` of the dialogues are copies: the induction
    heads form there (a lookup-only start sat at chance for thousands of steps)."""
    copy_warmup_fraction: float = 0.9
    """Share of copy dialogues during the warm-up."""
    eval_every: int = 100
    """Steps between held-out lookup checks (train_log.jsonl)."""
    eval_samples: int = 20
    """Final longpo-eval samples per length x depth cell."""
    question_chunks: int = 32
    """Held-out chunks for the final question-writing check."""


# --- tokenizer and rendering -------------------------------------------------------------------


def tokenizer_corpus(recipe: Recipe) -> list[str]:
    """Text the BPE tokenizer is trained on: dialogues and documents of the domain."""
    rng = random.Random(f"tokenizer:{recipe.seed}")
    texts = []
    for _ in range(recipe.tokenizer_dialogues):
        pairs = world.training_dialogue(rng, rng.randint(world.NUM_QUESTIONS, recipe.max_facts), 6)
        texts.append("\n".join(f"{u}\n{a}" for u, a in pairs))
    return texts + world.long_documents(
        4, 4 * world.SHORT_CONTEXT, recipe.seed, lambda t: len(t) // 4
    )


def extra_specials_key(tok: Any) -> str:
    """The tokenizer's list of extra special tokens: ``additional_special_tokens`` before
    transformers 5, ``extra_special_tokens`` from 5 on (the old name is gone there)."""
    old = "additional_special_tokens"
    return old if hasattr(tok, old) else "extra_special_tokens"


def build_tokenizer(path: Path, recipe: Recipe) -> Any:
    """Train, pad to a multiple of 64 with reserved specials, check the single-token rule."""
    from transformers import AutoTokenizer

    from longpo_megatron.datagen.tiny_model import make_tiny_tokenizer
    from longpo_megatron.eval.tasks import LOOKUP_KEYS

    make_tiny_tokenizer(path, tokenizer_corpus(recipe), recipe.bpe_vocab_size)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    extra = -len(tok) % 64
    if extra:
        key = extra_specials_key(tok)
        current = list(getattr(tok, key))
        tok.add_special_tokens({key: [*current, *(RESERVED.format(i) for i in range(extra))]})
        tok.save_pretrained(str(path))
    words = [f" {k}" for k in LOOKUP_KEYS] + [f" {v}" for v in world.all_values()]
    split = [w for w in words if len(tok.encode(w, add_special_tokens=False)) != 1]
    if split:
        raise PretrainError(
            f"--bpe-vocab-size={recipe.bpe_vocab_size}: {len(split)} keys/values are not single "
            f"tokens (e.g. {split[:3]}); raise it"
        )
    return tok


class Renderer:
    """Dialogues to (ids, response mask) exactly as the chat template renders them: special
    tokens at every turn boundary make the pieces independent (tested against render_chat)."""

    def __init__(self, tok: Any) -> None:
        self.backend = tok.backend_tokenizer
        ids = tok.convert_tokens_to_ids(["<|bos|>", "<|user|>", "<|eot|>", "<|assistant|>"])
        self.bos, self.user, self.eot, self.assistant = ids
        self.pad = tok.pad_token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def render(self, pairs: list[tuple[str, str]], limit: int) -> Optional[tuple[list, list]]:
        """The longest prefix of whole turns within ``limit`` tokens (None if even one is over)."""
        ids, mask = [self.bos], [False]
        for user, answer in pairs:
            u = [self.user, *self.encode(user), self.eot, self.assistant]
            a = [*self.encode(answer), self.eot]
            if len(ids) + len(u) + len(a) > limit:
                break
            ids += u + a
            mask += [False] * len(u) + [True] * len(a)
        return (ids, mask) if len(ids) > 1 else None


# --- data -------------------------------------------------------------------------------------


def curriculum_max(recipe: Recipe, step: int) -> int:
    """The largest fact count at ``step``: min_facts growing linearly to max_facts."""
    span = max(1, int(recipe.curriculum_fraction * recipe.steps))
    return recipe.min_facts + round(min(1.0, step / span) * (recipe.max_facts - recipe.min_facts))


def facts_at(recipe: Recipe, step: int, rng: random.Random) -> int:
    """Facts of one context: half the contexts use the curriculum's largest count."""
    hi = curriculum_max(recipe, step)
    return hi if rng.random() < 0.5 else rng.randint(recipe.min_facts, hi)


def mix_at(recipe: Recipe, step: int) -> tuple[float, float]:
    """(copy, recite) shares of the dialogues of batch ``step``: copies only, nearly, during
    the warm-up."""
    if step < recipe.copy_warmup_steps:
        return recipe.copy_warmup_fraction, 0.0
    return recipe.copy_fraction, recipe.recite_fraction


def make_batch(recipe: Recipe, renderer: Renderer, step: int) -> tuple[Any, Any]:
    """(input ids, labels) of batch ``step``: a pure function of (seed, step)."""
    rng = random.Random(f"batch:{recipe.seed}:{step}")
    rows = []
    while len(rows) < recipe.batch_size:
        n = facts_at(recipe, step, rng)
        while n >= recipe.min_facts:
            row = renderer.render(
                world.training_dialogue(
                    rng,
                    n,
                    recipe.max_turns,
                    recipe.repeat_questions,
                    *mix_at(recipe, step),
                ),
                world.SHORT_CONTEXT,
            )
            if row is not None:
                rows.append(row)
                break
            n -= 1
    return collate(rows, renderer.pad)


def collate(rows: list[tuple[list, list]], pad: int) -> tuple[Any, Any]:
    """Right-padded ids and labels (-100 outside the responses)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, mask) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, mask)])
    return ids, labels


def heldout(renderer: Renderer, n_facts: int, count: int, seed: int) -> tuple[Any, Any, Any]:
    """Single-question lookups over ``n_facts`` facts (never a training batch's seed): ids,
    labels and the position of each row's answer value."""
    import torch

    rng = random.Random(f"heldout:{seed}:{n_facts}")
    rows, where = [], []
    while len(rows) < count:
        pairs = world.answer_dialogue(rng, world.draw_facts(rng, n_facts), 1)
        row = renderer.render(pairs, world.SHORT_CONTEXT)
        if row is not None:
            value = renderer.encode(" " + pairs[0][1].split()[-1])
            ids, mask = row
            where.append(max(i for i, (t, m) in enumerate(zip(ids, mask)) if m and [t] == value))
            rows.append(row)
    return (*collate(rows, renderer.pad), torch.tensor(where))


def lookup_accuracy(model: Any, batch: tuple[Any, Any, Any], device: Any) -> float:
    """Share of held-out answers whose value token is the argmax (teacher forced)."""
    import torch

    ids, _, where = batch
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits
    rows = torch.arange(len(ids))
    pred = logits[rows, where.to(device) - 1].argmax(-1).cpu()
    return float((pred == ids[rows, where]).float().mean())


# --- model and training -----------------------------------------------------------------------


def build_model(recipe: Recipe, tok: Any) -> Any:
    """A fresh ``MistralForCausalLM``: full attention, plain RoPE, untied embeddings."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = MistralForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def resolve_device(name: str) -> Any:
    """``auto`` is cuda when available."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PretrainError("--device=cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise PretrainError(f"--device={name!r}: must be auto, cpu or cuda")
    return torch.device(name)


def train(recipe: Recipe, model: Any, tok: Any, log_path: Path) -> dict[str, Any]:
    """The training loop; appends one JSON line per check to ``log_path``."""
    import torch

    device = resolve_device(recipe.device)
    model.to(device).train()
    opt = _optimizer(recipe, model)
    renderer = Renderer(tok)
    checks = {n: heldout(renderer, n, 128, recipe.seed) for n in (4, recipe.max_facts)}
    start, losses, done = time.perf_counter(), [], 0
    last = min(recipe.steps, recipe.stop_at or recipe.steps)
    with log_path.open("w") as log:
        for step in range(last):
            if recipe.minutes is not None and time.perf_counter() - start > 60 * recipe.minutes:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(recipe, step)
            ids, labels = make_batch(recipe, renderer, step)
            loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            losses.append(loss.item())
            done = step + 1
            if done % recipe.eval_every == 0 or done == last:
                _log(log, _check(recipe, model, checks, device, step, losses, start))
                losses = []
        if losses:  # stopped by the time budget between two checks
            _log(log, _check(recipe, model, checks, device, done - 1, losses, start))
    model.eval()
    return {"steps_done": done, "seconds": round(time.perf_counter() - start, 1)}


def _optimizer(recipe: Recipe, model: Any) -> Any:
    """AdamW; weight decay on matrices only (not norms)."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98))


def _log(log: Any, row: dict[str, Any]) -> None:
    log.write(json.dumps(row) + "\n")
    log.flush()
    print(json.dumps(row), flush=True)


def _check(recipe, model, checks, device, step, losses, start) -> dict[str, Any]:
    """One train_log.jsonl row: loss, LR, held-out lookup accuracy per fact count, time."""
    model.eval()
    acc = {
        f"lookup_acc_{n}_facts": round(lookup_accuracy(model, b, device), 4)
        for n, b in checks.items()
    }
    model.train()
    return {
        "step": step + 1,
        "loss": round(sum(losses) / max(1, len(losses)), 4),
        "lr": lr_at(recipe, step),
        "max_facts": curriculum_max(recipe, step),
        **acc,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


# --- final measurements -------------------------------------------------------------------------


def measure_lookup(model_dir: Path, recipe: Recipe, work: Path) -> dict[str, Any]:
    """``longpo-eval`` itself (world.eval_overrides) at the short and the long length."""
    from hydra import compose, initialize_config_dir

    from longpo_megatron.eval.cli import CONF_DIR, run
    from longpo_megatron.eval.config import register_eval_configs, to_eval_config

    short, long = world.eval_lengths()
    overrides = [
        f"model={model_dir}",
        f"lengths=[{short},{long}]",
        f"samples={recipe.eval_samples}",
        f"seed={recipe.seed}",
        f"output_dir={work}",
        "backend.device=cpu",
        "save_samples=false",
        *world.eval_overrides(),
    ]
    register_eval_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_eval_config(compose(config_name="eval", overrides=overrides))
    result = run(cfg)
    table = result["summary"]["lookup"]
    return {
        "task": "lookup",
        "metric": result["metric"],
        "overrides": [o for o in overrides if not o.startswith(("model=", "output_dir="))],
        "short_length": short,
        "long_length": long,
        "short_accuracy": table[str(short)],
        "long_accuracy": table[str(long)],
        "chance": 1 / len(world.all_values()),
        "cells": result["cells"],
    }


def measure_questions(model_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Question writing on held-out chunks, judged by longpo-datagen's own parser: the share
    of chunks giving exactly NUM_QUESTIONS questions, and of questions about a key of the chunk."""
    from longpo_megatron.datagen.backends.base import GenerationRequest
    from longpo_megatron.datagen.backends.hf import HFBackend
    from longpo_megatron.datagen.chunking import chunk_document
    from longpo_megatron.datagen.config import BackendConfig, SamplingConfig
    from longpo_megatron.datagen.prompts import instruction_prompt, parse_questions

    backend = HFBackend(BackendConfig(model=str(model_dir), device="cpu", dtype="float32"))
    count = backend.count_tokens
    lo, hi = world.chunk_tokens()
    chunks: list[str] = []
    for doc in world.long_documents(
        4, world.LONG_FACTOR * world.SHORT_CONTEXT, -1 - recipe.seed, count
    ):
        chunks += [doc[c.start : c.end] for c in chunk_document(doc, count, lo, hi)[0]]
    chunks = chunks[: recipe.question_chunks]
    prompts = [instruction_prompt(world.QUESTION_TEMPLATE, c, world.NUM_QUESTIONS) for c in chunks]
    sampling = SamplingConfig(do_sample=False, max_new_tokens=world.QUESTION_TOKENS)
    reqs = [GenerationRequest(str(i), p, 0) for i, p in enumerate(prompts)]
    gens = backend.generate(reqs, sampling, 0)
    backend.close()
    ok = grounded = asked = 0
    for chunk, gen in zip(chunks, gens):
        parsed = parse_questions(
            gen.text, world.NUM_QUESTIONS, truncated=gen.finish_reason == "length"
        )
        ok += parsed.reason is None
        keys = world.parse_facts(chunk)
        for q in parsed.questions:
            asked += 1
            grounded += q.rstrip("?").split()[-1] in keys
    return {
        "chunks": len(chunks),
        "parse_ok": ok / max(1, len(chunks)),
        "questions": asked,
        "grounded": grounded / max(1, asked),
        "example": gens[0].text if gens else "",
    }


# --- files ------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sums(root: Path) -> None:
    """``SHA256SUMS`` (sha256sum format) of every other file under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{sha256(p)}  {p.relative_to(root).as_posix()}" for p in files]
    (root / SUMS).write_text("\n".join(lines) + "\n")


def verify(path: str | Path) -> None:
    """Check every file listed in ``<path>/SHA256SUMS``; raise :class:`ModelChecksumError`
    naming the first missing or modified file (the demo refuses a model it cannot trust)."""
    root = Path(path)
    sums = root / SUMS
    if not sums.is_file():
        raise ModelChecksumError(f"{sums}: missing; rebuild the model with `longpo-demo pretrain`")
    for n, line in enumerate(sums.read_text().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if (
            not sep
            or len(digest) != 64
            or not name
            or Path(name).is_absolute()
            or ".." in Path(name).parts
        ):
            raise ModelChecksumError(f"{sums}:{n}: not a '<sha256>  <relative path>' line")
        target = root / name
        if not target.is_file():
            raise ModelChecksumError(f"{target}: missing (listed in {sums})")
        got = sha256(target)
        if got != digest:
            raise ModelChecksumError(
                f"{target}: SHA256 {got[:12]}... differs from {digest[:12]}... in {sums}: the "
                "file was modified or corrupted; restore it or rebuild with `longpo-demo pretrain`"
            )


def build(recipe: Recipe, out: Path, measure: bool = True) -> dict[str, Any]:
    """Run the whole recipe into ``out`` (written next to it, then moved into place)."""
    import torch
    import transformers

    torch.set_num_threads(recipe.threads)
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    tok = build_tokenizer(stage, recipe)
    model = build_model(recipe, tok)
    run = train(recipe, model, tok, stage / "train_log.jsonl")
    model.to("cpu").save_pretrained(str(stage), safe_serialization=True)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "short_context": world.SHORT_CONTEXT,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **run,
    }
    (stage / "recipe.json").write_text(json.dumps(info, indent=1) + "\n")
    if measure:
        work = stage.with_name(stage.name + ".eval")
        acc = {
            "lookup": measure_lookup(stage, recipe, work),
            "questions": measure_questions(stage, recipe),
        }
        shutil.rmtree(work, ignore_errors=True)
        (stage / "accuracy.json").write_text(json.dumps(acc, indent=1) + "\n")
    write_sums(stage)
    shutil.rmtree(out, ignore_errors=True)
    stage.rename(out)
    return info


def _flag_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.lower() in ("true", "1")


FLAG_TYPES = {"Optional[float]": float, "Optional[int]": int, "bool": _flag_bool}
"""argparse types of Recipe fields whose default does not name the type."""


def parse_args(argv: Optional[list[str]]) -> tuple[Recipe, Path, bool]:
    """Flags: --out, --steps, --minutes, --seed, --device, and every other Recipe field."""
    ap = argparse.ArgumentParser(prog="longpo-demo pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="model directory to (re)write")
    ap.add_argument("--no-measure", action="store_true", help="skip accuracy.json (tests)")
    for f in dataclasses.fields(Recipe):
        kind = FLAG_TYPES.get(str(f.type)) or type(f.default)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    ns = vars(ap.parse_args(argv))
    out, no_measure = Path(ns.pop("out")), ns.pop("no_measure")
    recipe = Recipe(**ns)
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.max_facts < recipe.min_facts:
        raise PretrainError("need --steps >= 1, --batch-size >= 1 and --max-facts >= --min-facts")
    for copy, recite, names in (
        (recipe.copy_fraction, recipe.recite_fraction, "--copy-fraction + --recite-fraction"),
        (recipe.copy_warmup_fraction, 0.0, "--copy-warmup-fraction"),
    ):
        if min(copy, recite) < 0 or copy + recite > 1:
            raise PretrainError(f"{names} = {copy + recite:g}: shares must be >= 0, at most 1")
    return recipe, out, not no_measure


@report_user_errors
def main(argv: Optional[list[str]] = None) -> int:
    """``longpo-demo pretrain [--steps N] [--minutes M] [--seed S] [--device D] [--out DIR]``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe, out, measure = parse_args(argv)
    info = build(recipe, out, measure)
    print(f"model written to {out} ({info['steps_done']} steps, {info['seconds']:.0f} s)")
    if measure:
        acc = json.loads((out / "accuracy.json").read_text())["lookup"]
        print(
            f"lookup accuracy: short {acc['short_accuracy']:.3f}, long {acc['long_accuracy']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
