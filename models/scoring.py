"""ROUGE of summaries against references, with bootstrap intervals and the Lead-3 baseline.

Shared by `sumfleet eval` (the producer) and tuning's held-out check (the worker). Scores are
ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1, averaged over documents, each with a 95% bootstrap
interval (documents resampled with replacement). ROUGE-1/2/L come from Google's `rouge_score`;
ROUGE-L is one longest common subsequence (LCS) over the whole text. ROUGE-Lsum is this
module's own (`rouge_lsum`): both texts are split into sentences with `models.text.sentences_of`
(pysbd's rules for the text's language), and each reference sentence is matched against every summary
sentence (the union of their LCSs), the summary-level ROUGE-L of Lin (2004) that CNN/DailyMail
papers report (the `rougeLsum` of `rouge_score`, which expects one sentence per line). English
is scored on Porter-stemmed words (`rouge_score`'s own tokenizer); Chinese, Japanese and Korean on
characters, because `rouge_score`'s tokenizer keeps only ASCII letters and digits and so would
score any CJK text 0; every other language ("words": French, Russian, Arabic, ...) on lowercased
Unicode words, unstemmed, since that tokenizer would drop Cyrillic or Arabic letters and strip
accents ("voté" to "vot"). A summary that is empty (its job failed) scores 0 and still counts as a
document.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rouge_score import rouge_scorer, tokenizers

from models import defaults
from models.errors import ConfigError, InputError
from models.text import detect_language, is_cjk_text, lead, sentences_of

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
PACKAGE_TYPES = ("rouge1", "rouge2", "rougeL")  # what `rouge_score` computes; rougeLsum is `rouge_lsum`
LANGUAGES = ("auto", "en", "zh", "words")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # a word, with inner apostrophes (l'homme, don't)
_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
LSUM_NOTE = (
    "ROUGE-L: one longest common subsequence over the whole text; "
    "ROUGE-Lsum: sentences split first, union LCS per reference sentence (as CNN/DM papers report)"
)


@dataclass(frozen=True, slots=True)
class Pair:
    """One document's system summary and reference summary (and its text, for Lead-3)."""

    id: str
    summary: str  # "" (or None) when the job failed: scored 0
    reference: str
    document: str | None = None  # the source text; Lead-3 is computed from it
    group: str | None = None  # e.g. the document's category; None: in no group


@dataclass(frozen=True, slots=True)
class Score:
    """A mean F1 (0..1) with its 95% bootstrap interval: low <= mid <= high."""

    low: float
    mid: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"low": self.low, "mid": self.mid, "high": self.high}


@dataclass(slots=True)
class EvalReport:
    """The scores of one evaluation: overall, per group, for the system and for Lead-3."""

    n: int  # documents scored for the system (failed ones included)
    language: str  # "zh" scored on characters, "words" on Unicode words, "en" on stemmed English words
    system: dict[str, Score]  # "rouge1", "rouge2", "rougeL", "rougeLsum"
    lead3: dict[str, Score] | None  # None when no pair has its document
    groups: dict[str, dict[str, Any]]  # value -> {"n", "failed", "system", "lead3", "lead3_n"}
    failed: int = 0  # of `n`, how many summaries were empty (failed jobs, scored 0)
    lead3_n: int = 0  # documents Lead-3 was scored on (those with their text)
    group_field: str | None = None  # what the groups are values of, for the table
    bootstrap: int = 1000
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: F1 values as fractions (0..1), not percentages."""
        return {
            "n": self.n,
            "failed": self.failed,
            "language": self.language,
            "tokens": _token_note(self.language),
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "system": _scores_dict(self.system),
            "lead3": _scores_dict(self.lead3),
            "lead3_n": self.lead3_n,
            "group_field": self.group_field,
            "groups": {
                name: {
                    "n": g["n"],
                    "failed": g["failed"],
                    "system": _scores_dict(g["system"]),
                    "lead3": _scores_dict(g["lead3"]),
                    "lead3_n": g["lead3_n"],
                }
                for name, g in self.groups.items()
            },
        }

    def table(self) -> str:
        """A fixed-width table: a `system` and a `Lead-3` row for overall and each group.

        Cells are mean F1 in % with the 95% bootstrap interval: `41.23 [39.80, 42.61]`.
        """
        head = self.group_field or "group"
        rows: list[tuple[str, str, int, dict[str, Score] | None]] = [("overall", "system", self.n, self.system)]
        if self.lead3 is not None:
            rows.append(("", "Lead-3", self.lead3_n, self.lead3))
        for name, g in self.groups.items():
            rows.append((name, "system", g["n"], g["system"]))
            if self.lead3 is not None:
                rows.append(("", "Lead-3", g["lead3_n"], g["lead3"]))
        cells = [[_cell(scores, t) for t in ROUGE_TYPES] for *_, scores in rows]
        w_name = max(len(head), *(len(r[0]) for r in rows))
        w_n = max(1, *(len(str(r[2])) for r in rows))
        w_cell = max(len(_LABELS["rouge1"]), *(len(c) for row in cells for c in row))
        line = f"{{:<{w_name}}}  {{:<6}}  {{:>{w_n}}}  " + "  ".join([f"{{:<{w_cell}}}"] * len(ROUGE_TYPES))
        out = [
            f"ROUGE F1 in %: mean [95% bootstrap interval, {self.bootstrap} resamples]; "
            f"scored on {_token_note(self.language)}",
            line.format(head, "", "n", *(_LABELS[t] for t in ROUGE_TYPES)).rstrip(),
        ]
        for (name, who, n, _), row_cells in zip(rows, cells, strict=True):
            out.append(line.format(name, who, n, *row_cells).rstrip())
        if self.failed:
            note = f"{self.failed} of {self.n} summaries are empty (failed jobs) and score 0"
            by_group = [f"{name} {g['failed']}" for name, g in self.groups.items() if g["failed"]]
            if by_group:
                note += f" ({head}: {', '.join(by_group)})"
            out.append(note)
        if self.lead3 is not None and self.lead3_n < self.n:
            out.append(f"Lead-3 is scored on the {self.lead3_n} documents whose text is known")
        out.append(LSUM_NOTE)
        return "\n".join(out) + "\n"


class WordTokenizer(tokenizers.Tokenizer):
    """Lowercased Unicode words (NFKC; letters, digits and marks of any script), unstemmed: for
    languages other than English and CJK, which `rouge_score`'s ASCII-only tokenizer would drop."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


class CharTokenizer(tokenizers.Tokenizer):
    """Each letter, digit or CJK character is a token (NFKC-normalized, lowercased).

    For Chinese and Japanese, which have no spaces between words; punctuation and spaces
    are dropped, as `rouge_score`'s own tokenizer drops them for English.
    """

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum()]


def evaluate(
    pairs: Iterable[Pair],
    *,
    group_field: str | None = None,
    with_lead: bool = True,
    language: str = "auto",
    bootstrap: int = 1000,
    seed: int = 0,
) -> EvalReport:
    """Score `pairs` with ROUGE-1/2/L/Lsum F1, overall and per `Pair.group`, with Lead-3 alongside.

    `language` "en" scores stemmed words, "zh" characters, "words" unstemmed Unicode words; "auto"
    picks "zh" when most references are CJK text, else "words" when most are in a language other
    than English (`models.text.detect_language`), else "en". `bootstrap` resamples give each mean a
    95% interval (0: none, low = mid = high); the same `seed` gives the same intervals. `group_field` only names the
    groups in the table. Raises `InputError` for no pairs or an empty reference, `ConfigError`
    for an unknown language or a negative `bootstrap`.
    """
    if language not in LANGUAGES:
        known = ", ".join(LANGUAGES)
        raise ConfigError(f'unknown language "{language}" (expected one of: {known})')
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"bootstrap must be a whole number of resamples >= 0, got {bootstrap!r}")
    pairs = list(pairs)
    if not pairs:
        raise InputError("nothing to evaluate: no pairs of summary and reference")
    for p in pairs:
        if not isinstance(p.reference, str) or not p.reference.strip():
            raise InputError(f'id "{p.id}": the reference summary is empty')
    if language == "auto":
        language = scoring_language([p.reference for p in pairs])
    scorer, tokenizer = make_scorer(language), make_tokenizer(language)

    failed = np.array([not (p.summary or "").strip() for p in pairs])
    system = np.zeros((len(pairs), len(ROUGE_TYPES)))
    for i, p in enumerate(pairs):
        if not failed[i]:
            system[i] = _f1(scorer, tokenizer, p.reference, p.summary)
    has_doc = np.array([with_lead and bool((p.document or "").strip()) for p in pairs])
    lead_scores = np.zeros((len(pairs), len(ROUGE_TYPES)))
    for i, p in enumerate(pairs):
        if has_doc[i]:
            lead_scores[i] = _f1(scorer, tokenizer, p.reference, lead(p.document or "", defaults.LEAD_SENTENCES))

    def summarize(rows: np.ndarray) -> dict[str, Any]:
        docs = rows & has_doc
        return {
            "n": int(rows.sum()),
            "failed": int((rows & failed).sum()),
            "system": _interval(system[rows], bootstrap, seed),
            "lead3": _interval(lead_scores[docs], bootstrap, seed) if docs.any() else None,
            "lead3_n": int(docs.sum()),
        }

    overall = summarize(np.ones(len(pairs), dtype=bool))
    names = sorted({p.group for p in pairs if p.group is not None})
    groups = {name: summarize(np.array([p.group == name for p in pairs])) for name in names}
    return EvalReport(
        n=overall["n"],
        language=language,
        system=overall["system"],
        lead3=overall["lead3"],
        groups=groups,
        failed=overall["failed"],
        lead3_n=overall["lead3_n"],
        group_field=group_field,
        bootstrap=bootstrap,
        seed=seed,
    )


def scoring_language(references: Sequence[str]) -> str:
    """How `auto` scores these references: "zh" (characters) when most are CJK, "words" when most
    are in another language than English, else "en" (stemmed English words)."""
    if sum(is_cjk_text(text) for text in references) * 2 > len(references):
        return "zh"
    other = sum(detect_language(text) != "en" for text in references)
    return "words" if other * 2 > len(references) else "en"


def make_tokenizer(language: str) -> tokenizers.Tokenizer:
    """The tokens ROUGE counts: characters for "zh", Unicode words for "words", Porter-stemmed
    words (`rouge_score`'s) for "en"."""
    if language == "zh":
        return CharTokenizer()
    if language == "words":
        return WordTokenizer()
    return tokenizers.DefaultTokenizer(use_stemmer=True)


def make_scorer(language: str) -> rouge_scorer.RougeScorer:
    """`rouge_score`'s scorer of ROUGE-1/2/L for "en" (stemmed words), "zh" (characters) or "words";
    ROUGE-Lsum is `lsum_f1`."""
    return rouge_scorer.RougeScorer(list(PACKAGE_TYPES), tokenizer=make_tokenizer(language))


def _f1(
    scorer: rouge_scorer.RougeScorer, tokenizer: tokenizers.Tokenizer, reference: str, summary: str
) -> tuple[float, ...]:
    # rouge_score takes (target, prediction): the reference comes first.
    scores = scorer.score(reference, summary)
    return (*(float(scores[t].fmeasure) for t in PACKAGE_TYPES), lsum_f1(tokenizer, reference, summary))


# -- ROUGE-Lsum --------------------------------------------------------------------------------


def lsum_f1(tokenizer: tokenizers.Tokenizer, reference: str, summary: str) -> float:
    """ROUGE-Lsum F1 of `summary` against `reference`: each split into sentences
    (`models.text.sentences_of`: line breaks, `.!?` before a space, `。！？`), each sentence
    tokenized by `tokenizer`, then `rouge_lsum`."""
    return rouge_lsum(_sentence_tokens(tokenizer, reference), _sentence_tokens(tokenizer, summary))


def _sentence_tokens(tokenizer: tokenizers.Tokenizer, text: str) -> list[list[str]]:
    return [tokenizer.tokenize(sentence) for sentence in sentences_of(text)]


def rouge_lsum(reference: Sequence[Sequence[str]], summary: Sequence[Sequence[str]]) -> float:
    """Summary-level ROUGE-L F1 (Lin 2004, section 3.2) of tokenized sentences.

    For each reference sentence, the tokens of it that lie on a longest common subsequence with
    any summary sentence (the union of those LCSs) are hits; a token counts at most as often as
    it occurs in the summary and in the reference (as ROUGE-1.5.5 does). Recall is hits over the
    reference's tokens, precision hits over the summary's; 0 when either has no token.
    """
    ref_total = sum(len(sentence) for sentence in reference)
    sum_total = sum(len(sentence) for sentence in summary)
    if not ref_total or not sum_total:
        return 0.0
    left_in_reference = Counter(token for sentence in reference for token in sentence)
    left_in_summary = Counter(token for sentence in summary for token in sentence)
    hits = 0
    for sentence in reference:
        union: set[int] = set()
        for candidate in summary:
            union.update(lcs_positions(sentence, candidate))
        for position in sorted(union):
            token = sentence[position]
            if left_in_reference[token] > 0 and left_in_summary[token] > 0:
                hits += 1
                left_in_reference[token] -= 1
                left_in_summary[token] -= 1
    if not hits:
        return 0.0
    recall, precision = hits / ref_total, hits / sum_total
    return 2 * precision * recall / (precision + recall)


def lcs_positions(reference: Sequence[str], candidate: Sequence[str]) -> list[int]:
    """Positions in `reference` of one longest common subsequence with `candidate`.

    Of several LCSs, the one read back from the ends of both sequences, matching as late in the
    reference as the lengths allow (where stepping back in either sequence keeps the length, step
    back in the reference): the choice ROUGE-1.5.5 and `rouge_score` make, so unions agree.
    """
    rows, cols = len(reference), len(candidate)
    if not rows or not cols:
        return []
    # length[i][j]: LCS length of reference[:i] and candidate[:j]
    length = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        above, here = length[i - 1], length[i]
        token = reference[i - 1]
        for j in range(1, cols + 1):
            here[j] = above[j - 1] + 1 if token == candidate[j - 1] else max(above[j], here[j - 1])
    positions: list[int] = []
    i, j = rows, cols
    while i and j:
        if reference[i - 1] == candidate[j - 1]:
            positions.append(i - 1)
            i, j = i - 1, j - 1
        elif length[i][j - 1] > length[i - 1][j]:
            j -= 1
        else:
            i -= 1
    positions.reverse()
    return positions


def _interval(values: np.ndarray, bootstrap: int, seed: int) -> dict[str, Score]:
    """Mean of each column of `values` (documents x ROUGE types) with a 95% bootstrap interval.

    Resamples are drawn in chunks of about a million indices, so memory stays small for any
    number of documents; the draws depend only on `seed`, the row count and `bootstrap`.
    """
    k = len(values)
    mid = values.mean(axis=0)
    if bootstrap == 0:
        low, high = mid, mid
    else:
        rng = np.random.default_rng(seed)
        means = np.empty((bootstrap, values.shape[1]))
        chunk = max(1, 1_000_000 // k)
        for start in range(0, bootstrap, chunk):
            size = min(chunk, bootstrap - start)
            means[start : start + size] = values[rng.integers(0, k, size=(size, k))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5], axis=0)
        # The percentiles bracket the mean in practice; clamp for the last-bit rounding cases.
        low, high = np.minimum(low, mid), np.maximum(high, mid)
    return {t: Score(float(low[i]), float(mid[i]), float(high[i])) for i, t in enumerate(ROUGE_TYPES)}


def _scores_dict(scores: dict[str, Score] | None) -> dict[str, dict[str, float]] | None:
    return None if scores is None else {t: s.as_dict() for t, s in scores.items()}


def _cell(scores: dict[str, Score] | None, rouge_type: str) -> str:
    if scores is None:
        return "-"
    s = scores[rouge_type]
    return f"{100 * s.mid:.2f} [{100 * s.low:.2f}, {100 * s.high:.2f}]"


def _token_note(language: str) -> str:
    return {"zh": "characters", "words": "Unicode words (unstemmed)"}.get(language, "words (Porter-stemmed)")


# -- loading pairs -----------------------------------------------------------------------------


def score_summaries(summaries: list[str], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """ROUGE of `summaries` against the pairs' references (with Lead-3 of the pairs' documents)."""
    report = evaluate(
        [
            Pair(str(i), s, reference, document)
            for i, (s, (document, reference)) in enumerate(zip(summaries, pairs, strict=True))
        ]
    ).as_dict()
    return {"system": report["system"], "lead3": report["lead3"], "n": report["n"]}
