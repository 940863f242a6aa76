"""Cut a long document into chunks of ``[min_tokens, max_tokens]`` tokens on natural boundaries.

Boundaries, coarsest first: section headings (``boundary=section``), blank lines, line breaks,
sentence ends, whitespace, and as a last resort a hard cut between characters. Units are split
until each has at most ``max_tokens - min_tokens`` tokens, then packed greedily: a chunk closes
only when the next unit would overflow it, so it already holds more than ``min_tokens`` (token
counts of units are added up; each closed chunk is then recounted exactly and never exceeds
``max_tokens``). A short tail joins the previous chunk when it fits, else it stays unused by
instructions (it is still in the document, which the long context always holds whole).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Counter = Callable[[str], int]
"""Text -> number of tokens (the generating model's tokenizer)."""

BASE_LEVELS = (r"\n[ \t]*\n", r"\n", r"(?<=[.!?])\s+", r"\s+")


@dataclass(frozen=True)
class Chunk:
    """``text[start:end]`` of the document, with its exact token count."""

    index: int
    start: int
    end: int
    n_tokens: int


@dataclass
class ChunkStats:
    """What chunking did to one document."""

    hard_cuts: int = 0
    """Units cut between characters because no boundary was small enough."""
    unused_tail_tokens: int = 0
    """Tokens at the end that no chunk covers (a tail under min_tokens that did not fit)."""


Level = tuple[re.Pattern[str], bool]
"""A boundary pattern and whether to cut before its match (headings) or after it (separators)."""


def _pieces(text: str, start: int, end: int, level: Level) -> list[tuple[int, int]]:
    """Split ``[start, end)`` at each match of the level's pattern; pieces cover the span."""
    pattern, before = level
    marks = (m.start() if before else m.end() for m in pattern.finditer(text, start, end))
    cuts = [c for c in marks if start < c < end]
    bounds = [start, *sorted(set(cuts)), end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _hard_cut(
    text: str, start: int, end: int, limit: int, count: Counter, stats: ChunkStats
) -> list[tuple[int, int, int]]:
    """Cut between characters so each piece has at most ``limit`` tokens."""
    out: list[tuple[int, int, int]] = []
    while start < end:
        lo, hi = start + 1, end
        while lo < hi:  # the longest prefix that fits
            mid = (lo + hi + 1) // 2
            if count(text[start:mid]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        out.append((start, lo, count(text[start:lo])))
        stats.hard_cuts += 1
        start = lo
    return out


def split_units(
    text: str,
    limit: int,
    count: Counter,
    levels: list[Level],
    stats: ChunkStats,
    span: tuple[int, int] | None = None,
) -> list[tuple[int, int, int]]:
    """(start, end, n_tokens) units covering the span, each with at most ``limit`` tokens."""
    start, end = span if span is not None else (0, len(text))
    n = count(text[start:end])
    if n <= limit:
        return [(start, end, n)]
    for depth, level in enumerate(levels):
        pieces = _pieces(text, start, end, level)
        if len(pieces) > 1:
            out: list[tuple[int, int, int]] = []
            for piece in pieces:
                out += split_units(text, limit, count, levels[depth + 1 :], stats, piece)
            return out
    return _hard_cut(text, start, end, limit, count, stats)


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def chunk_document(
    text: str,
    count: Counter,
    min_tokens: int,
    max_tokens: int,
    boundary: str = "paragraph",
    section_pattern: str = r"^#{1,3} ",
) -> tuple[list[Chunk], ChunkStats]:
    """Chunks of ``text`` in order (possibly none when the text is under ``min_tokens``)."""
    levels: list[Level] = [(re.compile(p), False) for p in BASE_LEVELS]
    if boundary == "section":
        levels.insert(0, (re.compile(section_pattern, re.MULTILINE), True))
    stats = ChunkStats()
    units = split_units(text, max(1, max_tokens - min_tokens), count, levels, stats)
    groups: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    total = 0
    for unit in units:
        if current and total + unit[2] > max_tokens:
            groups.append(current)
            current, total = [], 0
        current.append(unit)
        total += unit[2]
    chunks: list[Chunk] = []
    for group in groups:
        chunks += _close(text, group, count, max_tokens, len(chunks))
    if current:
        chunks, unused = _close_tail(text, current, chunks, count, min_tokens, max_tokens)
        stats.unused_tail_tokens = unused
    return chunks, stats


def _close(
    text: str, group: list[tuple[int, int, int]], count: Counter, max_tokens: int, index: int
) -> list[Chunk]:
    """Exact chunks of a packed group; units move on if the exact count overflows."""
    out: list[Chunk] = []
    while group:
        keep = len(group)
        while True:
            start, end = _strip_span(text, group[0][0], group[keep - 1][1])
            n = count(text[start:end])
            if n <= max_tokens or keep == 1:
                break
            keep -= 1
        out.append(Chunk(index + len(out), start, end, n))
        group = group[keep:]
    return out


def _close_tail(
    text: str,
    tail: list[tuple[int, int, int]],
    chunks: list[Chunk],
    count: Counter,
    min_tokens: int,
    max_tokens: int,
) -> tuple[list[Chunk], int]:
    """Keep, merge or leave unused the last group; returns (chunks, unused tail tokens)."""
    start, end = _strip_span(text, tail[0][0], tail[-1][1])
    if start == end:
        return chunks, 0
    n = count(text[start:end])
    if n >= min_tokens:
        return chunks + _close(text, tail, count, max_tokens, len(chunks)), 0
    if chunks:
        last = chunks[-1]
        merged = count(text[last.start : end])
        if merged <= max_tokens:
            return chunks[:-1] + [Chunk(last.index, last.start, end, merged)], 0
    return chunks, n
