"""Prompts of the generation stages and parsing of the model's numbered questions.

The answer prompts are exactly the user turns that training renders (``data.tokenize``): the
chosen answer is written from ``chunk + "\\n\\n" + instruction`` (the reference's short prompt),
the rejected one from ``document + "\\n\\n" + instruction`` (the policy's first long turn).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_PREFIXES = (
    "Based on the text above,",
    "Drawing on the document you just read,",
    "Using only the information in the material above,",
    "With reference to the passage provided,",
    "According to the preceding document,",
    "Looking back at the text,",
    "In light of what the document describes,",
    "Considering the content above,",
    "From what the text explains,",
    "Relying on the document as your source,",
    "Going by the material given earlier,",
    "Taking the above document into account,",
    "Answer from the document above.",
    "Read the text above again if needed.",
    "Use the document above to answer.",
    "The question below is about the text above.",
    "Refer to the preceding material.",
    "Think about the document you were given.",
    "Keep the text above in mind.",
    "Answer with the help of the provided text.",
)
"""Phrases put before a kept question so instructions vary in how they point at the text."""

LOWER_AFTER_COMMA = {
    "what", "how", "why", "which", "who", "whom", "whose", "when", "where", "in", "to", "is",
    "are", "does", "do", "did", "can", "could", "would", "should", "explain", "describe",
    "summarize", "summarise", "compare", "discuss", "list", "identify", "outline", "analyze",
    "analyse", "evaluate", "give", "name", "for", "according", "if", "under", "based",
}  # fmt: skip
"""First words that are lower-cased when a comma prefix goes in front of them."""

IMPERATIVES = {
    "explain", "describe", "summarize", "summarise", "compare", "discuss", "list", "identify",
    "outline", "analyze", "analyse", "evaluate", "give", "name", "contrast", "trace",
    "characterize", "assess", "state", "provide", "suggest", "interpret", "detail",
}  # fmt: skip
"""First words that make a question-less line a well-formed instruction."""

NUMBERED = re.compile(
    r"^\s*(?:[*#>\-]+\s*)?(?:(?:question|q)\s*)?(\d{1,2})\s*[:.)\]]\s*(?:\*\*\s*)?(.*?)\s*$",
    re.IGNORECASE,
)
"""A numbered line: ``1: ...``, ``2. ...``, ``3) ...``, ``**Question 4:** ...``."""


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any parts, the same on every machine and Python run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def instruction_prompt(template: str, context: str, num_questions: int) -> str:
    """The question-writing request for one chunk (the chunk's text is inserted verbatim)."""
    return template.replace("{num_questions}", str(num_questions)).replace("{context}", context)


def answer_prompt(context: str, instruction: str) -> str:
    """User message of an answer: the same text training renders (data.tokenize)."""
    return f"{context}\n\n{instruction}"


@dataclass
class ParsedQuestions:
    """The outcome of parsing one question-writing answer."""

    questions: list[str] = field(default_factory=list)
    """Well-formed questions, in order."""
    malformed: int = 0
    """Numbered items that failed a well-formedness rule."""
    reason: Optional[str] = None
    """Why the chunk yields no instruction (None = usable)."""


def _well_formed(question: str, min_chars: int, max_chars: int, seen: set[str]) -> bool:
    words = question.split()
    if not (min_chars <= len(question) <= max_chars) or len(words) < 3:
        return False
    if "{" in question or "---" in question or not any(c.isalpha() for c in question):
        return False
    if not (question.endswith("?") or words[0].lower().strip("*:,") in IMPERATIVES):
        return False
    key = " ".join(question.lower().split())
    if key in seen:
        return False
    seen.add(key)
    return True


def _numbered_items(text: str) -> list[tuple[int, str]]:
    """(number, text) items; unnumbered lines continue an unfinished item."""
    items: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = NUMBERED.match(line)
        if match:
            items.append((int(match.group(1)), match.group(2).strip(" *")))
        elif items and line.strip() and not items[-1][1].endswith("?"):
            number, body = items[-1]
            items[-1] = (number, f"{body} {line.strip()}".strip())
    return items


def parse_questions(
    text: str,
    expected: int,
    *,
    truncated: bool = False,
    require_exact_count: bool = True,
    min_chars: int = 12,
    max_chars: int = 400,
) -> ParsedQuestions:
    """Parse ``1: ...`` .. ``N: ...`` questions; a truncated answer loses its last item."""
    items = _numbered_items(text)
    if truncated and items:
        items = items[:-1]
    if not items:
        return ParsedQuestions(reason="truncated" if truncated else "no_questions")
    if [n for n, _ in items] != list(range(1, len(items) + 1)):
        return ParsedQuestions(reason="bad_numbering")
    seen: set[str] = set()
    good = [q for _, q in items if _well_formed(q, min_chars, max_chars, seen)]
    out = ParsedQuestions(questions=good, malformed=len(items) - len(good))
    if require_exact_count and (len(items) != expected or out.malformed):
        out.reason = "truncated" if truncated else "wrong_count"
    elif not good:
        out.reason = "no_well_formed"
    return out


def with_prefix(question: str, prefix: str) -> str:
    """``prefix`` + question; after a comma, a common first word is lower-cased."""
    if not prefix:
        return question
    first, _, rest = question.partition(" ")
    if prefix.endswith(",") and first.lower() in LOWER_AFTER_COMMA and first[:1].isupper():
        question = f"{first.lower()} {rest}".rstrip()
    return f"{prefix} {question}"


def pick_instructions(
    questions: list[str],
    keep: int,
    prefixes: list[str],
    prefix_probability: float,
    rng: random.Random,
) -> list[tuple[str, str]]:
    """Choose ``keep`` questions (in their original order) and prefix them: (prefix, text)."""
    chosen = sorted(rng.sample(range(len(questions)), min(keep, len(questions))))
    out = []
    for i in chosen:
        prefix = rng.choice(prefixes) if prefixes and rng.random() < prefix_probability else ""
        out.append((prefix, with_prefix(questions[i], prefix)))
    return out
