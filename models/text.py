"""Text utilities both sides share: scripts and language, sentences, and the Lead-N extract.

One of each: the prompt variant (per document), the evaluation's scoring language, document
splitting and the `lead` engine all use these functions.
"""

from __future__ import annotations

import re

LANGUAGES = {"en": "English", "zh": "Chinese", "ja": "Japanese", "ko": "Korean"}  # what detection tells apart
CJK_LANGUAGES = frozenset({"zh", "ja", "ko"})

# (first, last, script) code point ranges of the scripts that tell CJK languages apart
_SCRIPTS = (
    (0x1100, 0x11FF, "hangul"),  # Hangul Jamo
    (0x3040, 0x30FF, "kana"),  # hiragana, katakana
    (0x31F0, 0x31FF, "kana"),  # katakana phonetic extensions
    (0x3400, 0x4DBF, "han"),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF, "han"),  # CJK unified ideographs
    (0xAC00, 0xD7AF, "hangul"),  # Hangul syllables
    (0xF900, 0xFAFF, "han"),  # CJK compatibility ideographs
    (0x20000, 0x3134F, "han"),  # extensions B-G, compatibility supplement
)

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace, or at CJK
# full stops, which need no space after them; the end mark stays with its sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+|(?<=[。！？])")


def script_of(char: str) -> str | None:
    """`han`, `kana` or `hangul` for a CJK character, `latin` for other letters, else None."""
    code = ord(char)
    for first, last, script in _SCRIPTS:
        if first <= code <= last:
            return script
    return "latin" if char.isalpha() else None


def detect_language(text: str, sample: int = 2000) -> str:
    """zh, ja, ko or en, from the scripts of the first `sample` characters (Latin and others: en).

    A text is CJK when its CJK characters are at least a fifth of its letters, so a few
    Chinese names in an English article leave it English.
    """
    counts = {"han": 0, "kana": 0, "hangul": 0, "latin": 0}
    for char in text[:sample]:
        script = script_of(char)
        if script is not None:
            counts[script] += 1
    cjk = counts["han"] + counts["kana"] + counts["hangul"]
    if cjk == 0 or cjk < counts["latin"] / 4:
        return "en"
    if counts["hangul"] >= max(counts["han"], counts["kana"]):
        return "ko"
    if counts["kana"] > 0 and counts["kana"] >= counts["han"] / 10:  # Japanese mixes kana into its kanji
        return "ja"
    return "zh"


def is_cjk_text(text: str) -> bool:
    """Whether `text` is Chinese, Japanese or Korean (see `detect_language`)."""
    return detect_language(text) in CJK_LANGUAGES


def written_without_spaces(char: str) -> bool:
    """CJK ideographs, kana and CJK punctuation, which sentences join without a space (Korean uses spaces)."""
    return "\u3000" <= char <= "\u9fff" or "\uff00" <= char <= "\uffef" or script_of(char) == "han"


def join_sentences(left: str, right: str) -> str:
    """`left` and `right` as one text: a space between them unless CJK writing needs none."""
    if not left or not right:
        return left + right
    gap = "" if written_without_spaces(left[-1]) or written_without_spaces(right[0]) else " "
    return left + gap + right


def sentences_of(paragraph: str) -> list[str]:
    """The sentences of one paragraph, whitespace-trimmed (line breaks inside count as breaks)."""
    out: list[str] = []
    for line in paragraph.splitlines():
        out.extend(s.strip() for s in _SENTENCE_END.split(line) if s and s.strip())
    return out


# Where a sentence may end inside a text: . ! ? (and ...) with closing quotes or brackets, before
# whitespace or the end of the text; or CJK full stops anywhere. The end mark stays with its sentence.
_SENTENCE_CLOSE = re.compile(r"(?:[.!?…]+[\"'”’)\]]*(?=\s|$))|(?:[。！？]+[”’」』）)]*)")
# A final "." after one of these ends no sentence: an abbreviation ("Mr.", "U.S."), an initial or a
# lone letter, or a list number ("2.": one or two digits starting a line or following a sentence)
_NOT_AN_END = re.compile(
    r"(?:(?:^|[\s(\"'“‘])(?:mr|mrs|ms|dr|prof|st|jr|sr|inc|ltd|co|corp|vs|etc|no|fig|e\.g|i\.e|[a-z]\.[a-z]|[a-z])"
    r"|(?:^|\n|[.!?:]\s)\s*(?:[-*•]\s*)?\d{1,2})\.$",
    re.IGNORECASE,
)


def _sentence_ends(text: str) -> list[int]:
    """Offsets just past each complete sentence of `text` (after its end mark and closing quotes)."""
    ends = []
    for match in _SENTENCE_CLOSE.finditer(text):
        mark = match.group()
        if mark.startswith(".") and mark.rstrip("\"'”’)]") == "." and _NOT_AN_END.search(text[: match.start() + 1]):
            continue
        ends.append(match.end())
    return ends


def ends_sentence(text: str) -> bool:
    """Whether `text` (trailing whitespace aside) ends with a complete sentence."""
    text = text.rstrip()
    ends = _sentence_ends(text)
    return bool(ends) and ends[-1] == len(text)


def trim_to_sentence(text: str) -> str | None:
    """`text` cut back to the end of its last complete sentence (see `ends_sentence`); `text` itself
    (trailing whitespace aside) when it ends one already; None when no sentence in it is complete.

    For a summary that stopped at its token limit mid-sentence: "The council voted. It will run
    every" becomes "The council voted."; abbreviations ("Mr.", "U.S."), initials and list numbers
    ("1.") are not taken for sentence ends.
    """
    text = text.rstrip()
    ends = _sentence_ends(text)
    return text[: ends[-1]] if ends else None


def lead(text: str, n: int) -> str:
    """The first `n` sentences of `text`, joined (the Lead-N baseline)."""
    joined = ""
    for sentence in sentences_of(text)[:n]:
        joined = join_sentences(joined, sentence)
    return joined
