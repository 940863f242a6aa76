"""Question parsing, prefixes, and prompts that match what training renders."""

from __future__ import annotations

import random

import pytest

from longpo_megatron.data.records import PreferenceRecord, Turn
from longpo_megatron.data.tokenize import long_pairs, short_pairs
from longpo_megatron.datagen.config import InstructionConfig
from longpo_megatron.datagen.prompts import (
    DEFAULT_PREFIXES,
    answer_prompt,
    instruction_prompt,
    parse_questions,
    pick_instructions,
    stable_seed,
    with_prefix,
)

FOUR = "\n".join(
    [
        "1: What changed when the towers were built?",
        "2. How did the keepers divide the night?",
        "3) Explain why a stopped lens was dangerous.",
        "**Question 4:** Why were fog signals unreliable at close range?",
    ]
)


def test_parses_numbering_styles() -> None:
    got = parse_questions("Sure! Here they are:\n" + FOUR + "\nHope this helps.", 4)
    assert got.reason is None and got.malformed == 0
    assert got.questions[2] == "Explain why a stopped lens was dangerous."
    assert got.questions[3] == "Why were fog signals unreliable at close range?"


def test_multi_line_question_is_joined() -> None:
    text = "1: How did the\nlamps change?\n2: Why?"
    got = parse_questions(text, 2, require_exact_count=False)
    assert got.questions == ["How did the lamps change?"] and got.malformed == 1


@pytest.mark.parametrize(
    ("text", "kwargs", "reason"),
    [
        ("No numbered lines at all.", {}, "no_questions"),
        ("1: What is it about?\n3: Why is the sky?", {}, "bad_numbering"),
        ("1: What is said about lamps?\n2: Why were reefs feared?", {}, "wrong_count"),
        (
            FOUR.replace("Why were fog signals unreliable at close range?", "Fog."),
            {},
            "wrong_count",
        ),
        (FOUR, {"truncated": True}, "truncated"),
        ("1: ok?\n2: no", {"require_exact_count": False}, "no_well_formed"),
    ],
)
def test_unusable_outputs_have_a_reason(text: str, kwargs: dict, reason: str) -> None:
    assert parse_questions(text, 4, **kwargs).reason == reason


def test_well_formedness_rules() -> None:
    text = "\n".join(
        [
            "1: Why?",  # too short
            "2: " + "Why " * 200 + "?",  # too long
            "3: The towers were tall.",  # not a question, not an imperative
            "4: Describe the work of the keepers.",
            "5: What did the keepers eat in winter?",
            "6: what did the keepers eat in winter?",  # duplicate
            "7: Summarise {context} please now?",  # template leak
        ]
    )
    got = parse_questions(text, 7, require_exact_count=False)
    assert got.questions == [
        "Describe the work of the keepers.",
        "What did the keepers eat in winter?",
    ]
    assert got.malformed == 5 and got.reason is None


def test_prefixes() -> None:
    assert len(DEFAULT_PREFIXES) >= 20 and len(set(DEFAULT_PREFIXES)) == len(DEFAULT_PREFIXES)
    assert with_prefix("What is X?", "Based on the text above,") == (
        "Based on the text above, what is X?"
    )
    assert (
        with_prefix("Lorgate grew why?", "Based on the text,")
        == "Based on the text, Lorgate grew why?"
    )
    assert with_prefix("What is X?", "Use the document above to answer.") == (
        "Use the document above to answer. What is X?"
    )
    assert with_prefix("What is X?", "") == "What is X?"


def test_pick_is_seeded_and_varied() -> None:
    qs = [f"What about item {i}?" for i in range(4)]
    pick = lambda key: pick_instructions(  # noqa: E731
        qs, 2, list(DEFAULT_PREFIXES), 1.0, random.Random(stable_seed(1, key))
    )
    assert pick("a") == pick("a")
    picks = {tuple(pick(str(k))) for k in range(30)}
    assert len(picks) > 20
    assert {p for many in picks for p, _ in many} <= set(DEFAULT_PREFIXES)
    assert pick_instructions(qs, 1, [], 1.0, random.Random(0))[0][0] == ""


def test_stable_seed_is_fixed() -> None:
    assert stable_seed(1234, "chosen", 0) == stable_seed(1234, "chosen", 0)
    assert stable_seed(1234, "chosen", 0) != stable_seed(1234, "chosen", 1)
    assert stable_seed("x") == 762385986  # the same on every machine and Python run


def test_prompts_match_the_training_rendering() -> None:
    rec = PreferenceRecord(
        "r", "DOC", (Turn("Q1?", "CHUNK1", "c1", "r1"), Turn("Q2?", "C2", "c", "r"))
    )
    assert short_pairs(rec, 0, "chosen")[0][0] == answer_prompt("CHUNK1", "Q1?")
    assert long_pairs(rec, "rejected")[0][0] == answer_prompt("DOC", "Q1?")
    template = InstructionConfig().template
    prompt = instruction_prompt(template, "Text with {num_questions} braces {context}", 4)
    assert prompt.startswith("Text with {num_questions} braces {context}")
    assert "Write 4 questions" in prompt
