"""The text domain of the CPU demo: facts ``- <key> <value>`` (the code of a key), one per line.

Everything here is a pure function of its seed. The keys are the made-up one-word keys of the
``lookup`` task of ``longpo-eval`` (longpo_megatron/eval/tasks.py) and the values two-digit
numbers, so the demo model's BPE tokenizer (trained on this text by ``longpo-demo pretrain``) has
every key and every value as a single token. The same domain serves three uses:

- pretraining the short-context starting model (:func:`training_dialogue`: contexts of at most
  :data:`SHORT_CONTEXT` tokens, answers to ``What is the code of <key>?`` and numbered questions,
  and recitations that teach the model to copy from its context);
- the long documents that ``longpo-datagen`` chunks and asks about (:func:`long_documents`);
- the ``lookup`` task of ``longpo-eval`` that measures the skill (:func:`eval_overrides`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from longpo_megatron.errors import UserError
from longpo_megatron.eval.tasks import LOOKUP_KEYS, lookup_fact, lookup_question

SHORT_CONTEXT = 128
"""The longest sequence (tokens, chat template included) the starting model was trained on."""
LONG_FACTOR = 8
"""Long contexts (datagen documents, long evaluation) are at least this many times longer."""
VALUE_DIGITS = 2
"""Digits of a value (10..99: one token each in the demo tokenizer)."""
CHUNK_TOKENS = (20, 36)
"""(min, max) tokens of a datagen chunk: 5-9 facts to ask about, and short enough that the chunk
prompt (template + chunk + question, <= ~50 tokens) lies in the positions where the starting
model finds every fact, so its chunk answer is right whenever the question names a key of the
chunk (measured: all of them, against 39% with 40-72-token chunks)."""
NUM_QUESTIONS = 3
"""Questions the model writes per chunk (datagen ``instructions.num_questions``)."""
KEEP_PER_CHUNK = 2
"""Questions kept per chunk (datagen ``instructions.keep_per_chunk``)."""
FACTS_PER_PARAGRAPH = (2, 4)
"""Facts per paragraph of a document (blank lines separate paragraphs: chunk boundaries)."""
QUESTION_TEMPLATE = "{context}\n\nWrite {num_questions} questions about the text above."
"""datagen ``instructions.template``: what the model learnt to answer with numbered questions."""
ANSWER_TOKENS = 6
"""max_new_tokens of an answer (key, value and end of turn, with room to spare)."""
RECITE_REQUEST = "Repeat the text above."
"""The user's request of a recitation dialogue (:func:`recite_dialogue`, :func:`copy_dialogue`)."""
FACT_LINE = "^{}$".format(
    re.escape(lookup_fact("KEY", "VALUE")).replace("KEY", r"(\S+)").replace("VALUE", r"(\d+)")
)
"""A fact line (:func:`parse_facts`), derived from the eval task's own ``lookup_fact``."""
COPY_WORDS = (8, 24)
"""(min, max) words of a :func:`copy_dialogue` (random keys and values)."""
QUESTION_TOKENS = 48
"""max_new_tokens of the question-writing stage (NUM_QUESTIONS questions of ~10 tokens)."""

Count = Callable[[str], int]
"""Tokens of a text in the demo model's tokenizer."""


class WorldError(UserError, ValueError):
    """A request the domain cannot satisfy (e.g. a document longer than its keys allow)."""


@dataclass(frozen=True)
class Fact:
    """One ``- <key> <value>`` line."""

    key: str
    value: str

    @property
    def text(self) -> str:
        return lookup_fact(self.key, self.value)

    @property
    def question(self) -> str:
        return lookup_question(self.key)

    @property
    def answer(self) -> str:
        """The assistant's answer: `` <key> <value>``, the tokens of the fact's line, so the
        value is what follows the key in the context (a copy, not a remapping)."""
        return f" {self.key} {self.value}"


def parse_facts(text: str) -> dict[str, str]:
    """key -> value of every fact line of ``text``."""
    return dict(re.findall(FACT_LINE, text, flags=re.MULTILINE))


def chunk_tokens() -> tuple[int, int]:
    """(min, max) tokens of a datagen chunk (:data:`CHUNK_TOKENS`)."""
    return CHUNK_TOKENS


def draw_value(rng: random.Random) -> str:
    """A value of :data:`VALUE_DIGITS` digits."""
    lo = 10 ** (VALUE_DIGITS - 1)
    return str(rng.randrange(lo, 10 * lo))


def all_values() -> list[str]:
    """Every possible value (the tokenizer must hold each as one token)."""
    lo = 10 ** (VALUE_DIGITS - 1)
    return [str(v) for v in range(lo, 10 * lo)]


def draw_facts(rng: random.Random, n: int) -> list[Fact]:
    """``n`` facts with distinct keys (values may repeat)."""
    if n > len(LOOKUP_KEYS):
        raise WorldError(f"{n} facts need more than the {len(LOOKUP_KEYS)} distinct keys")
    return [Fact(k, draw_value(rng)) for k in rng.sample(LOOKUP_KEYS, n)]


def layout(rng: random.Random, facts: list[Fact], paragraphs: bool) -> str:
    """Facts one per line; with ``paragraphs`` grouped by blank lines as in a document."""
    if not paragraphs:
        return "\n".join(f.text for f in facts)
    out, i = [], 0
    while i < len(facts):
        k = rng.randint(*FACTS_PER_PARAGRAPH)
        out.append("\n".join(f.text for f in facts[i : i + k]))
        i += k
    return "\n\n".join(out)


def question_list(facts: list[Fact]) -> str:
    """The numbered questions the model is taught to write (datagen's ``1: ...`` format)."""
    return "\n".join(f"{i}: {f.question}" for i, f in enumerate(facts, start=1))


def answer_dialogue(
    rng: random.Random, facts: list[Fact], turns: int, repeat: bool = False
) -> list[tuple[str, str]]:
    """(user, assistant) turns: the context and a question, then more questions alone (as
    the long sequences of LongPO records continue); each answer is the fact's key and value
    (:attr:`Fact.answer`). Every fact is asked once before ``repeat`` asks again (up to
    ``turns``: more lookups per sequence)."""
    context = layout(rng, facts, paragraphs=rng.random() < 0.5)
    asked = rng.sample(facts, min(turns, len(facts)))
    if repeat:
        asked += [rng.choice(facts) for _ in range(turns - len(asked))]
    pairs = [(f"{context}\n\n{asked[0].question}", asked[0].answer)]
    return pairs + [(f.question, f.answer) for f in asked[1:]]


def question_dialogue(rng: random.Random, facts: list[Fact], turns: int) -> list[tuple[str, str]]:
    """(user, assistant) turns: write :data:`NUM_QUESTIONS` numbered questions about a chunk
    (facts in document order), then answer them one by one."""
    from longpo_megatron.datagen.prompts import instruction_prompt

    context = layout(rng, facts, paragraphs=True)
    chosen = [facts[i] for i in sorted(rng.sample(range(len(facts)), NUM_QUESTIONS))]
    prompt = instruction_prompt(QUESTION_TEMPLATE, context, NUM_QUESTIONS)
    answers = [(f.question, f.answer) for f in rng.sample(chosen, len(chosen))]
    return [(prompt, question_list(chosen))] + answers[: max(0, turns - 1)]


def recite_dialogue(rng: random.Random, facts: list[Fact]) -> list[tuple[str, str]]:
    """One turn: a context of facts and :data:`RECITE_REQUEST`; the answer is the context.
    Every value of it follows its key, as in a lookup answer: a copy target at every fact
    instead of one per question."""
    context = layout(rng, facts, paragraphs=rng.random() < 0.5)
    return [(f"{context}\n\n{RECITE_REQUEST}", context)]


def copy_dialogue(rng: random.Random) -> list[tuple[str, str]]:
    """One turn: random keys and values and :data:`RECITE_REQUEST`; the answer repeats them.
    Nothing but the context predicts them: the dense signal that forms induction heads
    (attend to the token after the previous occurrence of the current one), which a lookup
    alone, one target per question, does not form in a CPU budget."""
    words = [
        rng.choice(LOOKUP_KEYS) if rng.random() < 0.5 else draw_value(rng)
        for _ in range(rng.randint(*COPY_WORDS))
    ]
    text = " ".join(words)
    return [(f"{text}\n\n{RECITE_REQUEST}", text)]


def training_dialogue(
    rng: random.Random,
    n_facts: int,
    turns: int,
    repeat: bool = False,
    copy: float = 0.0,
    recite: float = 0.0,
) -> list[tuple[str, str]]:
    """One pretraining dialogue: with probability ``copy`` a :func:`copy_dialogue`, with
    ``recite`` a :func:`recite_dialogue` of ``n_facts`` fresh facts; otherwise a lookup
    dialogue over them, or (one in four, when there are enough facts) a question-writing one."""
    draw = rng.random()
    if draw < copy:
        return copy_dialogue(rng)
    facts = draw_facts(rng, n_facts)
    if draw < copy + recite:
        return recite_dialogue(rng, facts)
    if n_facts >= NUM_QUESTIONS and rng.random() < 0.25:
        return question_dialogue(rng, facts, turns)
    return answer_dialogue(rng, facts, turns, repeat)


def eval_lengths() -> tuple[int, int]:
    """(short, long) prompt lengths for ``longpo-eval``: within SHORT_CONTEXT (room for the
    answer) and LONG_FACTOR times SHORT_CONTEXT."""
    return SHORT_CONTEXT - ANSWER_TOKENS, LONG_FACTOR * SHORT_CONTEXT


def long_documents(n: int, tokens: int, seed: int, count: Count) -> list[str]:
    """``n`` documents of at least ``tokens`` tokens each, paragraphs of facts, keys unique
    within a document (every chunk of :func:`chunk_tokens` tokens holds several facts)."""
    docs = []
    for d in range(n):
        rng = random.Random(f"demo-doc:{seed}:{d}")
        keys = list(LOOKUP_KEYS)
        rng.shuffle(keys)
        paragraphs: list[str] = []
        used = 0
        while not paragraphs or count("\n\n".join(paragraphs)) < tokens:
            k = rng.randint(*FACTS_PER_PARAGRAPH)
            if used + k > len(keys):
                raise WorldError(
                    f"long_documents: tokens={tokens} needs more than the {len(keys)} distinct "
                    "keys of the domain; ask for shorter documents"
                )
            facts = [Fact(key, draw_value(rng)) for key in keys[used : used + k]]
            paragraphs.append("\n".join(f.text for f in facts))
            used += k
        docs.append("\n\n".join(paragraphs))
    return docs


def datagen_overrides() -> list[str]:
    """Hydra overrides of ``longpo-datagen`` that ask what the model was taught to answer."""
    lo, hi = CHUNK_TOKENS
    template = QUESTION_TEMPLATE.replace("'", "\\'")
    return [
        f"instructions.template='{template}'",
        f"instructions.num_questions={NUM_QUESTIONS}",
        f"instructions.keep_per_chunk={KEEP_PER_CHUNK}",
        "instructions.prefix_probability=0.0",
        f"instructions.sampling.max_new_tokens={QUESTION_TOKENS}",
        f"chosen.sampling.max_new_tokens={ANSWER_TOKENS}",
        f"rejected.sampling.max_new_tokens={ANSWER_TOKENS}",
        f"chunking.min_tokens={lo}",
        f"chunking.max_tokens={hi}",
        "chunking.boundary=paragraph",
        "filters.min_chars=2",
        "filters.min_alpha_fraction=0.0",
        # the rejected answer is what the model says given the whole document: running on
        # past ANSWER_TOKENS is the long-context failure itself
        "filters.check_rejected=false",
        "filters.keep_truncated_rejected=true",
    ]


def eval_overrides() -> list[str]:
    """``longpo-eval`` overrides that measure the skill (lengths are chosen by the caller)."""
    return [
        "tasks=[lookup]",
        f"options.value_digits={VALUE_DIGITS}",
        "mode=generate",
        "metric=contains",
        "depths=[0.0,0.25,0.5,0.75,1.0]",
        f"max_new_tokens={ANSWER_TOKENS}",
    ]
