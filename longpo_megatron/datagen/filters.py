"""Answer filters: empty, truncated, over-long, refusal, degenerate repetition, meaningless.

Each check returns the reason key of the first rule an answer breaks (None = usable), so the
report can count every dropped pair by reason.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional

from longpo_megatron.datagen.config import FilterConfig

DEFAULT_REFUSALS = (
    r"\bI(?:'m| am) (?:sorry|afraid|unable|not able)\b",
    r"\bI (?:cannot|can't|can not|won't|will not) (?:help|assist|answer|provide|comply)",
    r"\bas an (?:AI|artificial intelligence)(?: language model)?\b",
    r"\bI(?:'m| am) (?:just )?an AI\b",
    r"\b(?:text|passage|document|context) (?:does not|doesn't) (?:provide|contain|mention|"
    r"include|say|specify)",
    r"\b(?:is|are) not (?:mentioned|provided|specified|stated|given) in the "
    r"(?:text|passage|document|context)",
    r"\bthere is no (?:information|mention)\b",
    r"\bI do not have (?:access|enough information)\b",
    r"\bagainst (?:my|the) (?:guidelines|policy|policies)\b",
)
"""Refusal and non-answer phrases (case-insensitive)."""

REASONS = ("empty", "truncated", "over_long", "refusal", "repetition", "meaningless")


class AnswerFilter:
    """Applies :class:`FilterConfig` to one generated answer."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        patterns = list(cfg.refusal_patterns) or list(DEFAULT_REFUSALS)
        self._refusal = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)

    def reason(self, text: str, n_tokens: int, finish_reason: str) -> Optional[str]:
        """The first rule ``text`` breaks, or None."""
        stripped = text.strip()
        if len(stripped) < self.cfg.min_chars:
            return "empty"
        if finish_reason == "length":
            return "truncated"
        limit = self.cfg.max_answer_tokens
        if limit is not None and n_tokens > limit:
            return "over_long"
        if self._refusal.search(stripped):
            return "refusal"
        if self.repetitive(stripped):
            return "repetition"
        if self.meaningless(stripped):
            return "meaningless"
        return None

    def repetitive(self, text: str) -> bool:
        """Degenerate loops: a long run of one word, or mostly repeated word n-grams."""
        words = text.lower().split()
        run = 1
        for a, b in zip(words, words[1:]):
            run = run + 1 if a == b else 1
            if run > self.cfg.max_same_token_run:
                return True
        n = self.cfg.ngram
        if len(words) < 4 * n:
            return False
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        repeated = total - len(grams)
        return repeated / total > self.cfg.max_repeated_ngram_fraction

    def meaningless(self, text: str) -> bool:
        """Too few letters among the visible characters (symbol soup, digit streams)."""
        visible = [c for c in text if not c.isspace()]
        letters = sum(c.isalpha() for c in visible)
        return letters < self.cfg.min_alpha_fraction * len(visible)
