"""Splitting long documents into pieces (no model: a word count stands in for the tokenizer)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import pytest

from models.text import sentences_of
from tests.worker.longdoc import long_document
from worker.splitting import split_document


def words(texts: Sequence[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def chars(texts: Sequence[str]) -> list[int]:
    return [len(t) for t in texts]


def test_a_long_document_becomes_bounded_pieces_that_cover_it_in_order() -> None:
    text = long_document(5200)
    assert len(text.split()) >= 5200
    pieces = split_document(text, 400, words)
    assert len(pieces) >= 13  # 5,200 words at 400 per piece, plus overlap
    assert all(len(p.split()) <= 400 for p in pieces)
    # every sentence is in some piece, and the pieces follow the document's order
    position = 0
    for sentence in [s for paragraph in text.split("\n\n") for s in sentences_of(paragraph)]:
        found = [i for i, piece in enumerate(pieces) if sentence in piece]
        assert found, sentence
        assert max(found) >= position
        position = min(i for i in found if i >= position)


def test_pieces_end_on_sentence_boundaries_and_overlap_a_little() -> None:
    text = long_document(3000)
    pieces = split_document(text, 300, words, overlap=0.1)
    for piece in pieces:
        assert re.search(r"[.!?]$|Chapter \d+: .+$", piece), piece[-80:]
    overlaps = 0
    for before, after in itertools.pairwise(pieces):
        first = sentences_of(after.split("\n\n")[0])[0]
        if first in before:
            overlaps += 1
            shared = before[before.rindex(first) :]
            assert len(shared.split()) <= 30  # within 10% of the piece size
    assert overlaps >= len(pieces) - 2  # (almost) every boundary repeats the sentences before it


def test_paragraph_breaks_survive_inside_pieces() -> None:
    text = "First paragraph one. First paragraph two.\n\nSecond paragraph one. Second paragraph two."
    (piece,) = split_document(text, 100, words)
    assert piece == text


def test_a_sentence_over_the_limit_is_cut_at_word_boundaries() -> None:
    sentence = " ".join(f"word{i}" for i in range(250))  # one sentence, no full stop
    pieces = split_document(sentence, 100, words, overlap=0)
    assert [len(p.split()) for p in pieces] == [100, 100, 50]
    assert " ".join(pieces) == sentence


def test_chinese_text_splits_on_its_full_stops_without_spaces() -> None:
    text = "".join(f"第{i}句话讲的是港口的渡轮。" for i in range(60))
    pieces = split_document(text, 60, chars, overlap=0)
    assert len(pieces) > 1 and all(len(p) <= 60 for p in pieces)
    assert all(p.endswith("。") for p in pieces)
    assert "".join(pieces) == text


def test_no_text_no_pieces_and_a_bad_limit_is_refused() -> None:
    assert split_document("  \n\n ", 10, words) == []
    with pytest.raises(ValueError, match="piece limit must be positive"):
        split_document("text", 0, words)
