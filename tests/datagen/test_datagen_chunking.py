"""Chunking: token bounds, natural boundaries, sections, hard cuts, tails."""

from __future__ import annotations

import random

import pytest
from dg_helpers import CORPUS

from longpo_megatron.datagen.chunking import chunk_document


def words(text: str) -> int:
    return len(text.split())


def essay(seed: int, paragraphs: int) -> str:
    rng = random.Random(seed)
    paras = []
    for p in range(paragraphs):
        sentences = [
            " ".join(f"w{p}x{s}x{k}" for k in range(rng.randint(4, 14))) + "."
            for s in range(rng.randint(1, 8))
        ]
        paras.append(" ".join(sentences))
    return "\n\n".join(paras)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("lo", "hi"), [(50, 120), (100, 150), (200, 200)])
def test_chunks_respect_bounds_and_boundaries(seed: int, lo: int, hi: int) -> None:
    text = essay(seed, 60)
    chunks, stats = chunk_document(text, words, lo, hi)
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        piece = text[c.start : c.end]
        assert c.n_tokens == words(piece) and c.n_tokens <= hi
        assert piece == piece.strip()
        assert c.start == 0 or text[c.start - 1].isspace()  # starts on a boundary
    assert all(c.n_tokens >= lo for c in chunks)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))
    covered = sum(c.n_tokens for c in chunks) + stats.unused_tail_tokens
    assert covered == words(text)
    # Cuts fall between paragraphs, or between sentences of a paragraph over max - min
    # (min == max leaves no room: then any whitespace is a boundary).
    if hi - lo >= 20:
        assert all(c.start == 0 or text[c.start - 2 : c.start] in ("\n\n", ". ") for c in chunks)


def test_short_text_gives_no_chunk() -> None:
    chunks, stats = chunk_document("a b c", words, 10, 20)
    assert chunks == [] and stats.unused_tail_tokens == 3
    text = "\n\n".join(["a " * 15, "b " * 15, "c " * 3])
    chunks, stats = chunk_document(text, words, 5, 20)
    assert [c.n_tokens for c in chunks] == [15, 18] and stats.unused_tail_tokens == 0


def test_unused_tail_is_counted() -> None:
    text = "\n\n".join(["a " * 12, "b " * 5, "c " * 4])
    chunks, stats = chunk_document(text, words, 8, 20)
    assert [c.n_tokens for c in chunks] == [17] and stats.unused_tail_tokens == 4


def test_tail_joins_the_last_chunk_when_the_exact_count_allows() -> None:
    def merging(text: str) -> int:  # a tokenizer that merges across paragraph breaks
        return len(text.split()) - text.count("\n\n")

    text = "\n\n".join(["a " * 12, "b " * 5, "c " * 4])
    chunks, stats = chunk_document(text, merging, 8, 20)
    assert [(c.start, c.end) for c in chunks] == [(0, len(text.rstrip()))]
    assert stats.unused_tail_tokens == 0


def test_sections_come_first() -> None:
    body = "\n\n".join(["x " * 30] * 2)
    text = "\n".join(f"\\section{{S{i}}}\n{body}" for i in range(4))
    pattern = r"^(?:\\(?:chapter|section|subsection)\b|#{1,3} )"
    chunks, _ = chunk_document(text, words, 40, 130, "section", pattern)
    assert [c.n_tokens for c in chunks] == [122, 122]
    assert all(text[c.start :].startswith("\\section") for c in chunks)


def test_hard_cut_when_no_boundary_fits() -> None:
    text = "x" * 500
    chunks, stats = chunk_document(text, len, 50, 100)
    assert stats.hard_cuts > 0 and all(50 <= c.n_tokens <= 100 for c in chunks)
    assert "".join(text[c.start : c.end] for c in chunks) == text


def test_bundled_corpus_chunks_on_paragraphs() -> None:
    text = (CORPUS / "lantern_service.txt").read_text().strip()
    chunks, stats = chunk_document(text, words, 300, 600)
    assert len(chunks) >= 3 and stats.hard_cuts == 0
    assert all(300 <= c.n_tokens <= 600 for c in chunks)
