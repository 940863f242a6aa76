"""RULER-style synthetic long-context tasks, generated at any length, seed and depth.

Every sample is a long ``context``, a ``question``, the ``answers`` (all must appear in a
correct output) and, for the log-likelihood mode, ``choices`` with the correct one at ``label``.
Nothing is downloaded: the haystack is made of bland generated sentences, the needles of random
words and numbers. A sample is a pure function of (seed, task, length, depth, index), so a rerun,
another machine or another model sees exactly the same text.

``length`` is the target length of ``context + question`` in tokens of the evaluated model's
tokenizer (``count`` counts them); the haystack is filled up to it sentence by sentence.
``depth`` in [0, 1] is where the (asked) needle sits: the share of the distractor text (the
context without the needles) that comes before it; 0 = start of the context, 1 = end.

Tasks (RULER's names): ``niah_single``, ``niah_multikey``, ``niah_multivalue``,
``niah_multiquery`` (needle retrieval), ``vt`` (variable tracking), ``cwe`` (aggregation: the
most common words) and ``qa`` (question answering over a paragraph buried in distractors), plus
``lookup`` (key -> value lookup in a dense list of ``- <key> <value>`` lines with made-up one-word
keys: the domain of the CPU demo's starting model, see longpo_megatron/demo/world.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from longpo_megatron.errors import UserError

Count = Callable[[str], int]
"""Tokens of a piece of plain text in the evaluated model's tokenizer."""

ADJECTIVES = (
    "quiet green narrow bright early silver hollow gentle crooked distant golden humble rusty "
    "sleepy wooden steady"
).split()
NOUNS = (
    "river lantern garden meadow harbor orchard valley bridge window mountain cottage village "
    "forest market island tower"
).split()
VERBS = "rests waits shines stands drifts glows sleeps turns".split()
PLACES = "hill road shore gate field wall square pond".split()
NAMES = (
    "Alder Brisa Corwin Dagny Elowen Farrel Greta Hollis Ingrid Jorah Kestrel Linnea Marek "
    "Nerys Oskar Petra Quill Rowan Saskia Torin Ulla Vesna Wendel Ximena Yorick Zelda"
).split()
CITIES = (
    "Varnholt Quillmere Ostrava Brennick Thalby Corvane Eskdale Marrow Fenwick Luthany "
    "Sorrel Dunmere Halvik Pellar Wistow Ambergate"
).split()
PROFESSIONS = (
    "baker carpenter weaver cartographer potter glassblower beekeeper clockmaker ferryman librarian"
).split()
ANIMALS = "goat parrot tortoise ferret donkey heron hound raven".split()
COLORS = "red blue amber grey white black violet ochre".split()


class TaskError(UserError, ValueError):
    """A task name or option that cannot generate samples."""


@dataclass
class TaskOptions:
    """Shape of the generated tasks (RULER's defaults unless noted)."""

    value_digits: int = 7
    """Digits of a needle's magic number."""
    num_keys: int = 4
    """niah_multikey: needles with different keys (one is asked for)."""
    num_values: int = 4
    """niah_multivalue: needles with the same key (all are asked for)."""
    num_queries: int = 4
    """niah_multiquery: keys asked for at once."""
    vt_hops: int = 4
    """vt: assignments in the chain (VAR A = 123, VAR B = VAR A, ...)."""
    cwe_top_k: int = 3
    """cwe: how many most common words are asked for."""
    cwe_common_freq: int = 20
    """cwe: occurrences of each common word (others occur 3 times)."""
    qa_entities: int = 8
    """qa: entity paragraphs at least (more are added to reach the length)."""
    num_choices: int = 4
    """Log-likelihood mode: options per multiple-choice question (correct one included)."""


@dataclass(frozen=True)
class Sample:
    """One generated example; ``needles`` are the (start, end) character spans of the inserted
    needles in ``context``, the asked one first."""

    task: str
    length: int
    depth: Optional[float]
    """None for tasks without a needle position (cwe)."""
    index: int
    context: str
    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()
    label: int = -1
    """Index of the correct choice (-1 without choices)."""
    needles: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    @property
    def prompt(self) -> str:
        """The single user message the model sees."""
        return f"{self.context}\n\n{self.question}"

    @property
    def target(self) -> str:
        """A correct answer text (what a trained model should say)."""
        return ", ".join(self.answers)


def _number(rng: random.Random, digits: int) -> str:
    if digits == 1:
        return str(rng.randrange(10))
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct(rng: random.Random, make: Callable[[], str], n: int, avoid: set[str]) -> list[str]:
    """``n`` distinct values of ``make()`` not in ``avoid`` (raises when the space is too small)."""
    out: list[str] = []
    for _ in range(200 * n + 200):
        if len(out) == n:
            return out
        v = make()
        if v not in avoid and v not in out:
            out.append(v)
    raise TaskError(f"cannot draw {n} distinct values (too few digits / words for the options)")


def _filler(rng: random.Random) -> str:
    return (
        f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
        f"near the {rng.choice(PLACES)}."
    )


class _Budget:
    """Token budget of a context: counts each piece once (pieces are joined by spaces)."""

    def __init__(
        self, length: int, count: Count, fixed: list[str], task: str = "", sep: str = " "
    ) -> None:
        self.count, self.cache, self.sep = count, {}, sep
        need = sum(self.tokens(p) for p in fixed)
        self.left = length - need
        if self.left < 0 and task:
            raise TaskError(
                f"{task}: length={length} tokens is too short: its needles and question alone "
                f"take {need} tokens (use a longer length or fewer keys / values / hops)"
            )

    def tokens(self, piece: str) -> int:
        if piece not in self.cache:
            self.cache[piece] = self.count(self.sep + piece)
        return self.cache[piece]

    def take(self, piece: str) -> bool:
        """Spend the piece's tokens if they fit."""
        cost = self.tokens(piece)
        if cost > self.left:
            return False
        self.left -= cost
        return True


def _haystack(rng: random.Random, budget: _Budget) -> list[str]:
    out: list[str] = []
    while budget.take(piece := _filler(rng)):
        out.append(piece)
    return out


def _place(
    hay: list[str], items: list[tuple[float, str]], separator: str = " "
) -> tuple[str, list[tuple[int, int]]]:
    """Insert each (depth, text) into ``hay`` at that fraction of its sentences (stable order)
    and join; returns the text and each item's character span, in ``items`` order."""
    slots: dict[int, list[int]] = {}
    for k, (depth, _) in enumerate(items):
        slots.setdefault(round(depth * len(hay)), []).append(k)
    pieces: list[tuple[Optional[int], str]] = []
    for pos in range(len(hay) + 1):
        pieces += [(k, items[k][1]) for k in slots.get(pos, [])]
        if pos < len(hay):
            pieces.append((None, hay[pos]))
    text, spans, offset = [], [(0, 0)] * len(items), 0
    for k, piece in pieces:
        if k is not None:
            spans[k] = (offset, offset + len(piece))
        text.append(piece)
        offset += len(piece) + len(separator)
    return separator.join(text), spans


def _choices(
    rng: random.Random,
    answers: tuple[str, ...],
    others: list[str],
    make: Callable[[], str],
    n: int,
) -> tuple[tuple[str, ...], int]:
    """``n`` options (answer lists joined by ", "): the correct one, and wrong ones that swap one
    answer for a distractor (from ``others`` first, then fresh ``make()`` values)."""
    pool = [o for o in dict.fromkeys(others) if o not in answers]
    correct = ", ".join(answers)
    options = [correct]
    for _ in range(200 * n):
        if len(options) == n:
            break
        wrong = list(answers)
        wrong[rng.randrange(len(wrong))] = pool.pop(0) if pool else make()
        if len(set(wrong)) == len(wrong) and ", ".join(wrong) not in options:
            options.append(", ".join(wrong))
    if len(options) < n:
        raise TaskError(f"cannot draw {n} distinct choices (too few digits / words)")
    rng.shuffle(options)
    return tuple(options), options.index(correct)


def _word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up word (about 10^6 of them at 3 syllables)."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah(rng: random.Random, task: str, length: int, depth: float, opts: TaskOptions, count):
    n_keys = {"niah_multikey": opts.num_keys, "niah_multiquery": opts.num_queries}.get(task, 1)
    keys = _distinct(rng, lambda: _key(rng), n_keys, set())
    n_values = opts.num_values if task == "niah_multivalue" else 1
    number = lambda: _number(rng, opts.value_digits)  # noqa: E731
    values = _distinct(rng, number, n_keys * n_values, set())
    pairs = [(keys[i // n_values], v) for i, v in enumerate(values)]
    asked = pairs if task in ("niah_multivalue", "niah_multiquery") else pairs[:1]
    if task == "niah_multiquery":
        subject, what = f"{', '.join(keys[:-1])} and {keys[-1]}", "the special magic numbers"
    elif task == "niah_multivalue":
        subject, what = keys[0], "all the special magic numbers"
    else:
        subject, what = keys[0], "the special magic number"
    plural = len(asked) > 1
    question = (
        f"What {'are' if plural else 'is'} {what} for {subject} mentioned in the provided text? "
        f"Answer with the {'numbers' if plural else 'number'} only."
    )
    needles = [_needle(k, v) for k, v in pairs]
    budget = _Budget(length, count, [*needles, question], task)
    hay = _haystack(rng, budget)
    depths = [depth] + [rng.random() for _ in needles[1:]]
    context, spans = _place(hay, list(zip(depths, needles)))
    answers = tuple(v for _, v in asked)
    choices, label = _choices(rng, answers, values[len(asked) :], number, opts.num_choices)
    return context, question, answers, choices, label, spans


def _var(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _vt(rng: random.Random, task: str, length: int, depth: float, opts: TaskOptions, count):
    names = _distinct(rng, lambda: _var(rng), 2 * opts.vt_hops, set())
    number = lambda: _number(rng, opts.value_digits)  # noqa: E731
    value, other = _distinct(rng, number, 2, set())
    chain, decoy = names[: opts.vt_hops], names[opts.vt_hops :]

    def statements(vars_: list[str], val: str) -> list[str]:
        first = [f"VAR {vars_[0]} = {val}."]
        return first + [f"VAR {b} = VAR {a}." for a, b in zip(vars_, vars_[1:])]

    mine, theirs = statements(chain, value), statements(decoy, other)
    question = (
        f"Find all variables that are assigned the value {value} in the text above. "
        "Answer with the variable names only."
    )
    hay = _haystack(rng, _Budget(length, count, [*mine, *theirs, question], task))
    step = (1.0 - depth) / len(mine)
    items = [(depth + i * step, s) for i, s in enumerate(mine)]
    items += list(zip(sorted(rng.random() for _ in theirs), theirs))
    context, spans = _place(hay, items)
    make = lambda: _var(rng)  # noqa: E731
    choices, label = _choices(rng, tuple(chain), decoy, make, opts.num_choices)
    return context, question, tuple(chain), choices, label, spans[: len(mine)]


def _cwe(rng: random.Random, task: str, length: int, depth: float, opts: TaskOptions, count):
    make = lambda: _word(rng)  # noqa: E731
    common = _distinct(rng, make, opts.cwe_top_k, set())
    question = (
        f"What are the {opts.cwe_top_k} most common words in the numbered list above? "
        "Answer with the words only."
    )
    for freq in range(opts.cwe_common_freq, 3, -1):  # fewer repeats when the length is short
        words = [w for w in common for _ in range(freq)]
        items = [f"{i}. {w}" for i, w in enumerate(words, start=1)] + [question]
        budget = _Budget(length, count, items, task if freq == 4 else "")
        if budget.left >= 0:
            break
    rare: list[str] = []
    seen = set(common)
    while True:
        word = make()
        if word in seen:
            continue
        seen.add(word)
        at = len(words) + 3 * len(rare)  # numbers 1..N are the same digits in any order
        if not all(budget.take(f"{at + j + 1}. {word}") for j in range(3)):
            break
        rare.append(word)
    words += [w for w in rare for _ in range(3)]
    rng.shuffle(words)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    choices, label = _choices(rng, tuple(common), rare, make, opts.num_choices)
    return context, question, tuple(common), choices, label, ()


ATTRIBUTES: dict[str, Callable[[random.Random], str]] = {
    "city": lambda rng: rng.choice(CITIES),
    "job": lambda rng: rng.choice(PROFESSIONS),
    "year": lambda rng: str(rng.randrange(1700, 1990)),
    "pet": lambda rng: f"{rng.choice(COLORS)} {rng.choice(ANIMALS)}",
}
"""qa: how each attribute of an entity is drawn."""


def _entity(rng: random.Random, name: str) -> dict[str, str]:
    return {"name": name, **{key: draw(rng) for key, draw in ATTRIBUTES.items()}}


def _paragraph(e: dict[str, str]) -> str:
    return (
        f"{e['name']} is a {e['job']} who lives in {e['city']}. {e['name']} was born in "
        f"{e['year']} and keeps a {e['pet']}."
    )


QA_QUESTIONS = {
    "city": "In which city does {name} live?",
    "job": "What is the profession of {name}?",
    "year": "In which year was {name} born?",
    "pet": "What animal does {name} keep?",
}


def _qa(rng: random.Random, task: str, length: int, depth: float, opts: TaskOptions, count):
    surname = lambda: f"{rng.choice(NAMES)} {_word(rng, 2).capitalize()}son"  # noqa: E731
    gold = _entity(rng, surname())
    attr = rng.choice(sorted(QA_QUESTIONS))
    question = (
        "Answer the question based on the paragraphs above. "
        + QA_QUESTIONS[attr].format(name=gold["name"])
        + " Answer with a few words only."
    )
    budget = _Budget(length, count, [_paragraph(gold), question], task, sep="\n\n")
    used, hay, others = {gold["name"]}, [], []
    while True:
        name = surname()
        if name in used:
            continue
        entity = _entity(rng, name)
        if not budget.take(_paragraph(entity)):
            break
        used.add(name)
        hay.append(_paragraph(entity))
        others.append(entity[attr])
    context, spans = _place(hay, [(depth, _paragraph(gold))], separator="\n\n")
    make = lambda: ATTRIBUTES[attr](rng)  # noqa: E731
    choices, label = _choices(rng, (gold[attr],), others, make, opts.num_choices)
    return context, question, (gold[attr],), choices, label, spans


def _lookup_key_list(n: int = 512) -> tuple[str, ...]:
    rng = random.Random("lookup-keys")
    return tuple(_distinct(rng, lambda: _word(rng, 3), n, set()))


LOOKUP_KEYS = _lookup_key_list()
"""lookup: the made-up keys (one word each, so a tokenizer trained on the facts has them as
single tokens); a context never repeats a key, filler sentences follow when they run out."""


def lookup_fact(key: str, value: str) -> str:
    """lookup: one fact, one line of a context: a list item, the value right after its key
    (the layout a copy -- "the token after this key" -- answers)."""
    return f"- {key} {value}"


def lookup_question(key: str) -> str:
    """lookup: the question about ``key`` (also what the demo model writes in datagen)."""
    return f"What is the code of {key}?"


def _lookup(rng: random.Random, task: str, length: int, depth: float, opts: TaskOptions, count):
    number = lambda: _number(rng, opts.value_digits)  # noqa: E731
    keys = list(LOOKUP_KEYS)
    rng.shuffle(keys)
    gold, value = keys.pop(), number()
    question = lookup_question(gold)
    budget = _Budget(length, count, [lookup_fact(gold, value), question], task, sep="\n")
    hay, others = [], []
    for key in keys:
        other = number()
        if not budget.take(lookup_fact(key, other)):
            break
        hay.append(lookup_fact(key, other))
        others.append(other)
    else:  # every key is used: the rest of the length is filler
        hay += _haystack(rng, budget)
    context, spans = _place(hay, [(depth, lookup_fact(gold, value))], separator="\n")
    choices, label = _choices(rng, (value,), others, number, opts.num_choices)
    return context, question, (value,), choices, label, spans


GENERATORS = {
    "niah_single": _niah,
    "niah_multikey": _niah,
    "niah_multivalue": _niah,
    "niah_multiquery": _niah,
    "vt": _vt,
    "cwe": _cwe,
    "qa": _qa,
    "lookup": _lookup,
}
"""Task name -> generator ``(rng, task, length, depth, options, count) -> fields``."""
DEPTHLESS = ("cwe",)
"""Tasks whose answer has no position (generated once per length, depth None)."""


def check_task(task: str) -> None:
    """Refuse an unknown task name, listing the known ones."""
    if task not in GENERATORS:
        raise TaskError(f"tasks: unknown task {task!r}; known: {sorted(GENERATORS)}")


def generate(
    task: str,
    length: int,
    depth: Optional[float],
    index: int,
    seed: int,
    count: Count,
    opts: Optional[TaskOptions] = None,
) -> Sample:
    """Sample ``index`` of ``task`` at ``length`` tokens and ``depth`` (deterministic)."""
    check_task(task)
    opts = opts or TaskOptions()
    if task not in DEPTHLESS and (depth is None or not 0.0 <= depth <= 1.0):
        raise TaskError(f"{task}: depth={depth!r} must lie in [0, 1]")
    if length < 1:
        raise TaskError(f"{task}: length={length!r} must be > 0")
    depth = None if task in DEPTHLESS else float(depth)
    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{index}")
    fields = GENERATORS[task](rng, task, length, depth if depth is not None else 0.0, opts, count)
    context, question, answers, choices, label, spans = fields
    return Sample(
        task, length, depth, index, context, question, answers, choices, label, tuple(spans)
    )


def grid(
    tasks: list[str], lengths: list[int], depths: list[float]
) -> list[tuple[str, int, Optional[float]]]:
    """Every (task, length, depth) cell; depthless tasks get one cell per length."""
    cells: list[tuple[str, int, Optional[float]]] = []
    for task in tasks:
        check_task(task)
        for length in lengths:
            cells += (
                [(task, length, None)] if task in DEPTHLESS else [(task, length, d) for d in depths]
            )
    return cells
