"""Warnings on a generated summary: `empty`, `echo`, `repetition`, `truncated`.

Each result row carries the list of those that apply (`warnings`, empty when none). They are
checks on the text alone, pure functions with fixed thresholds, cheap next to generation:

- `empty`: no letter or digit in the output (nothing at all, or only punctuation and spaces).
- `echo`: the output repeats its input verbatim instead of summarizing it. Either (a) it holds a
  run of the prompt's instruction text (the template without the document) at least 60% as long
  as the instruction, and at least 3 and at most 8 tokens long ("summarize the following article
  in one" echoes the one-sentence prompt); or (b) a run of at least 12 consecutive tokens of the
  document's opening (its first 256 tokens) makes up at least half of the output's tokens (the
  model copied the start of the article).
- `repetition`: some 4 consecutive tokens occur 3 times or more in the output ("the company
  said that the company said that the company said that", or one word six times in a row), or a
  sentence of 5 tokens or more occurs twice.
- `truncated`: generation stopped at the token limit (`finish_reason` "length") and the output
  does not end with a complete sentence (trimming was off, or found no sentence to cut back to).

Tokens are lowercased (NFKC) runs of letters and digits; each CJK character (Han, kana) is a token
of its own, as for ROUGE on Chinese. Punctuation and spaces are ignored, so "Hello, world" and
"hello world" are the same two tokens.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence

from models.text import ends_sentence, sentences_of

WARNINGS = ("empty", "echo", "repetition", "truncated")  # every code a result's `warnings` may hold

ECHO_INSTRUCTION_SHARE = 0.6  # a run of at least this share of the instruction's tokens is an echo of it
ECHO_INSTRUCTION_MIN = 3  # ... and at least this many tokens (shorter instructions, e.g. "TL;DR:", are not checked)
ECHO_INSTRUCTION_MAX = 8  # ... but at most this many are ever required (long custom instructions)
ECHO_OPENING_TOKENS = 256  # the document's opening: its first tokens, where an echoing model copies from
ECHO_RUN_MIN = 12  # a verbatim run from the opening this long ...
ECHO_SUMMARY_SHARE = 0.5  # ... that is at least this share of the output's tokens is an echo
REPEAT_NGRAM = 4  # tokens in a row ...
REPEAT_TIMES = 3  # ... occurring this often in one output are repetition
REPEAT_SENTENCE_MIN = 5  # a sentence of at least this many tokens occurring twice is repetition

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def tokens(text: str) -> list[str]:
    """The tokens the checks compare: lowercased words and numbers, and single CJK characters."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def longest_shared_run(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest run of consecutive tokens that occurs in both `a` and `b`."""
    where: defaultdict[str, list[int]] = defaultdict(list)
    for position, token in enumerate(b):
        where[token].append(position)
    best = 0
    previous: dict[int, int] = {}  # position in b -> length of the shared run ending there
    for token in a:
        current = {position: previous.get(position - 1, 0) + 1 for position in where.get(token, ())}
        best = max(best, *current.values()) if current else best
        previous = current
    return best


def is_empty(summary: str | None) -> bool:
    """No letter or digit in `summary`."""
    return not summary or not any(char.isalnum() for char in summary)


def is_echo(summary: str, instructions: str = "", document: str = "") -> bool:
    """Whether `summary` repeats the prompt's `instructions` or the `document`'s opening (see the module)."""
    said = tokens(summary)
    if not said:
        return False
    asked = tokens(instructions)
    if len(asked) >= ECHO_INSTRUCTION_MIN:
        need = min(ECHO_INSTRUCTION_MAX, max(ECHO_INSTRUCTION_MIN, math.ceil(ECHO_INSTRUCTION_SHARE * len(asked))))
        if longest_shared_run(said, asked) >= need:
            return True
    if document:
        run = longest_shared_run(said, tokens(document[: ECHO_OPENING_TOKENS * 20])[:ECHO_OPENING_TOKENS])
        if run >= ECHO_RUN_MIN and run >= ECHO_SUMMARY_SHARE * len(said):
            return True
    return False


def is_repetitive(summary: str) -> bool:
    """Whether `summary` repeats itself (see the module)."""
    said = tokens(summary)
    grams = Counter(tuple(said[i : i + REPEAT_NGRAM]) for i in range(len(said) - REPEAT_NGRAM + 1))
    if grams and max(grams.values()) >= REPEAT_TIMES:
        return True
    sentences = Counter(tuple(tokens(sentence)) for sentence in sentences_of(summary))
    return any(len(sentence) >= REPEAT_SENTENCE_MIN and times >= 2 for sentence, times in sentences.items())


def warnings_for(
    summary: str | None, *, instructions: str = "", document: str = "", finish_reason: str | None = None
) -> list[str]:
    """The warning codes of one output, in `WARNINGS` order (empty list: none apply).

    `instructions` is the prompt without the document, `document` the source text (either may be
    empty: that check is skipped), `finish_reason` why generation stopped (`length`, `stop`, None).
    """
    if is_empty(summary):
        return ["empty"]
    assert summary is not None
    found = []
    if is_echo(summary, instructions, document):
        found.append("echo")
    if is_repetitive(summary):
        found.append("repetition")
    if finish_reason == "length" and not ends_sentence(summary):
        found.append("truncated")
    return found
