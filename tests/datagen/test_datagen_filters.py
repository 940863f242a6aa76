"""Answer filters: one case per reason, and usable answers pass."""

from __future__ import annotations

import pytest

from longpo_megatron.datagen.config import FilterConfig
from longpo_megatron.datagen.filters import AnswerFilter


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ("", "stop", "empty"),
        (" \n ", "stop", "empty"),
        ("A fine start that was cut", "length", "truncated"),
        ("I'm sorry, but I can't help with that.", "stop", "refusal"),
        ("As an AI language model, I have no opinion.", "stop", "refusal"),
        ("The passage does not mention the keepers' pay.", "stop", "refusal"),
        ("yes " * 20, "stop", "repetition"),
        ("the light was on and " * 12, "stop", "repetition"),
        ("%%% 123 456 ### 789 @@@ !!!", "stop", "meaningless"),
    ],
)
def test_each_reason(text: str, finish: str, reason: str) -> None:
    assert AnswerFilter(FilterConfig()).reason(text, len(text.split()), finish) == reason


def test_good_answers_pass_and_limits_apply() -> None:
    good = (
        "The keepers split the night into watches; the one on watch trimmed the wick, wound the "
        "clockwork and wrote in the log every few hours."
    )
    filt = AnswerFilter(FilterConfig())
    assert filt.reason(good, 30, "stop") is None
    assert AnswerFilter(FilterConfig(max_answer_tokens=10)).reason(good, 30, "stop") == "over_long"
    custom = AnswerFilter(FilterConfig(refusal_patterns=[r"\bwatches\b"]))
    assert custom.reason(good, 30, "stop") == "refusal"


def test_truncated_rejected_answers_are_kept_only_when_asked() -> None:
    """Cut-off REJECTED answers are dropped even with check_rejected=false, unless
    keep_truncated_rejected; an empty one and a failed chosen answer are always dropped."""
    from longpo_megatron.datagen.grouping import pair_reason

    def row(text: str, finish: str = "stop") -> dict:
        n = len(text.split())
        return {"status": "ok", "text": text, "n_tokens": n, "finish_reason": finish}

    good, empty, cut = row(" kavoxe 42"), row(""), row(" kavoxe kavoxe kav", "length")
    for keep, want_cut in ((False, "rejected_truncated"), (True, None)):
        filt = AnswerFilter(FilterConfig(check_rejected=False, keep_truncated_rejected=keep))
        assert pair_reason(filt, good, cut, False) == want_cut
        assert pair_reason(filt, good, empty, False) == "rejected_empty"
        assert pair_reason(filt, empty, good, False) == "chosen_empty"
        assert pair_reason(filt, cut, good, False) == "chosen_truncated"
