"""The task generators: deterministic per seed, needles where they say at every depth, answers
recoverable from the text by plain string search, lengths as asked."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from longpo_megatron.data.tokenizer import ByteChatTokenizer
from longpo_megatron.eval.render import prompt_ids, template_overhead, token_counter
from longpo_megatron.eval.tasks import (
    DEPTHLESS,
    GENERATORS,
    TaskError,
    TaskOptions,
    generate,
    grid,
)

WORDS = lambda text: len(text.split())  # noqa: E731
"""Whitespace words: a tokenizer-free count (exactly additive)."""
NEEDLE_TASKS = [t for t in GENERATORS if t not in DEPTHLESS]


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_deterministic_per_seed(task: str) -> None:
    a = generate(task, 400, 0.3, 2, seed=7, count=WORDS)
    assert a == generate(task, 400, 0.3, 2, seed=7, count=WORDS)
    assert a != generate(task, 400, 0.3, 2, seed=8, count=WORDS)
    assert a != generate(task, 400, 0.3, 3, seed=7, count=WORDS)


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_sits_at_its_depth(task: str, depth: float) -> None:
    s = generate(task, 2000, depth, 0, seed=1, count=WORDS)
    start, end = s.needles[0]
    needle = s.context[start:end]
    assert s.answers[0] in needle  # the span is the asked needle
    if task == "vt":
        value = re.search(r"assigned the value (\d+)", s.question).group(1)
        assert needle == f"VAR {s.answers[0]} = {value}."
    # the share of the distractor text (all but the needles) before it is the depth, to within
    # one haystack sentence
    sep = 2 if task == "qa" else 1
    inserted = sum(b - a + sep for a, b in s.needles)
    before = start - sum(b - a + sep for a, b in s.needles if b <= start)
    hay = len(s.context) + sep - inserted
    sentence = max(len(p) for p in re.split(r"(?<=\.)\s+", s.context)) + sep
    assert abs(before / hay - depth) <= sentence / hay + 1e-9
    if depth == 0.0:
        assert start == 0
    if depth == 1.0 and task in ("niah_single", "qa"):
        assert end == len(s.context)


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_answers_recoverable_by_string_search(task: str) -> None:
    for depth in (0.0, 0.5, 1.0):
        s = generate(task, 1500, depth, 1, seed=3, count=WORDS)
        for answer in s.answers:
            assert answer in s.context, (task, answer)
        if task.startswith("niah"):  # each asked value sits in "... for <key> is: <value>."
            for answer in s.answers:
                hits = re.findall(rf"magic numbers for ([\w-]+) is: {answer}\.", s.context)
                assert len(hits) == 1 and hits[0] in s.question
        if s.choices:
            assert s.choices[s.label] == ", ".join(s.answers)
            assert len(set(s.choices)) == len(s.choices) == TaskOptions().num_choices


def test_cwe_answers_are_the_most_common_words() -> None:
    s = generate("cwe", 3000, None, 0, seed=5, count=WORDS)
    counts = Counter(re.findall(r"\d+\. (\w+)", s.context))
    top = [w for w, _ in counts.most_common(len(s.answers))]
    assert sorted(top) == sorted(s.answers)
    assert counts.most_common()[len(s.answers)][1] < min(counts[a] for a in s.answers)


def test_vt_chain_resolves_to_the_value() -> None:
    s = generate("vt", 1000, 0.2, 0, seed=2, count=WORDS)
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    bound = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.context))
    resolve = lambda v: resolve(bound[v[4:]]) if v.startswith("VAR ") else v  # noqa: E731
    holding = sorted(k for k in bound if resolve(bound[k]) == value)
    assert holding == sorted(s.answers) and len(holding) == TaskOptions().vt_hops


@pytest.mark.parametrize("task", sorted(GENERATORS))
@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_length_in_tokens(task: str, length: int) -> None:
    tok = ByteChatTokenizer()
    budget = length - template_overhead(tok)
    s = generate(task, budget, 0.5, 0, seed=0, count=token_counter(tok))
    n = len(prompt_ids(tok, s.prompt))
    slack = 100 if task == "qa" else 60  # at most one unfilled paragraph / sentence
    assert length - slack <= n <= length + 2, (task, n)


def test_grid_and_bad_input() -> None:
    cells = grid(["niah_single", "cwe"], [100, 200], [0.0, 1.0])
    assert cells == [
        ("niah_single", 100, 0.0),
        ("niah_single", 100, 1.0),
        ("niah_single", 200, 0.0),
        ("niah_single", 200, 1.0),
        ("cwe", 100, None),
        ("cwe", 200, None),
    ]
    with pytest.raises(TaskError, match="unknown task 'ruler'"):
        grid(["ruler"], [100], [0.0])
    with pytest.raises(TaskError, match=r"depth=1.5 must lie in \[0, 1\]"):
        generate("niah_single", 100, 1.5, 0, 0, WORDS)
    with pytest.raises(TaskError, match="niah_multiquery: length=40 tokens is too short"):
        generate("niah_multiquery", 40, 0.5, 0, 0, WORDS)
    with pytest.raises(TaskError, match="distinct"):
        generate("niah_single", 100, 0.5, 0, 0, WORDS, TaskOptions(value_digits=1, num_choices=11))
