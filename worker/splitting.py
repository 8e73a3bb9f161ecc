"""Cutting a long document into token-bounded pieces for map-reduce summarization (no torch).

Pieces end on paragraph boundaries where they can, else on sentence boundaries, and only
cut inside a sentence that alone is over the limit. Each piece after the first starts with
the last sentences of the one before it (a little overlap), so a fact that straddles a
boundary is seen whole at least once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from models import defaults
from models.text import detect_language, join_sentences, sentences_of

_PARAGRAPH = re.compile(r"\n\s*\n")

Counter = Callable[[Sequence[str]], list[int]]  # token counts of several texts, in one call


def _cut_to_fit(text: str, limit: int, count: Counter) -> list[str]:
    """A sentence over `limit` tokens cut into parts that fit, by binary search on characters."""
    parts: list[str] = []
    rest = text
    while rest:
        if count([rest])[0] <= limit:
            parts.append(rest)
            break
        low, high = 1, len(rest)  # the longest prefix (in characters) that fits
        while low < high:
            middle = (low + high + 1) // 2
            if count([rest[:middle]])[0] <= limit:
                low = middle
            else:
                high = middle - 1
        cut = low
        space = rest.rfind(" ", 0, cut)  # prefer a word boundary in the last fifth
        if space > cut * 4 // 5:
            cut = space
        parts.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return [p for p in parts if p]


def split_document(text: str, limit: int, count: Counter, overlap: float = defaults.PIECE_OVERLAP) -> list[str]:
    """`text` as pieces of at most about `limit` tokens each (see the module docstring).

    Token counts are summed per sentence, which can differ from the joined text's count by
    a token per boundary; callers keep a small margin under their real limit.
    """
    if limit < 1:
        raise ValueError(f"piece limit must be positive, got {limit}")
    units: list[tuple[str, bool]] = []  # (sentence, starts a paragraph)
    language = detect_language(text)  # once: every paragraph is split by the document's language's rules
    for paragraph in _PARAGRAPH.split(text.strip()):
        for position, sentence in enumerate(sentences_of(paragraph, language)):
            units.append((sentence, position == 0))
    if not units:
        return []
    counts = count([u[0] for u in units])
    sized: list[tuple[str, bool, int]] = []
    for (sentence, starts), n in zip(units, counts, strict=False):
        if n <= limit:
            sized.append((sentence, starts, n))
            continue
        for index, part in enumerate(_cut_to_fit(sentence, limit, count)):
            sized.append((part, starts and index == 0, count([part])[0]))

    overlap_limit = int(limit * overlap)
    pieces: list[str] = []
    current: list[tuple[str, bool, int]] = []
    fresh = 0  # sentences in `current` that are not overlap from the previous piece
    total = 0
    for unit in sized:
        if current and fresh and total + unit[2] > limit:
            pieces.append(_join(current))
            carried: list[tuple[str, bool, int]] = []
            carried_total = 0
            for previous in reversed(current):  # whole sentences from the end, within the overlap share
                if carried_total + previous[2] > overlap_limit or carried_total + previous[2] + unit[2] > limit:
                    break
                carried.insert(0, previous)
                carried_total += previous[2]
            current, total, fresh = carried, carried_total, 0
        current.append(unit)
        total += unit[2]
        fresh += 1
    if current and fresh:
        pieces.append(_join(current))
    return pieces


def _join(units: Sequence[tuple[str, bool, int]]) -> str:
    text = ""
    for sentence, starts, _ in units:
        text = text + "\n\n" + sentence if text and starts else join_sentences(text, sentence)
    return text
