"""ROUGE evaluation of a batch's summaries against reference summaries, with a Lead-3 baseline.

Scores are ROUGE-1, ROUGE-2 and ROUGE-L F1 from Google's `rouge_score` package, averaged over
documents, each with a 95% bootstrap interval (documents resampled with replacement). English
is scored on Porter-stemmed words (`rouge_score`'s own tokenizer); Chinese (and Japanese) on
characters, because `rouge_score`'s tokenizer keeps only ASCII letters and digits and so would
score any CJK text 0.

A summary that is empty (its job failed) scores 0 and still counts as a document, so a run
that fails on hard documents cannot look better than one that does not.

Typical use (the `sumfleet eval` command):

    pairs = pairs_from_files("results.jsonl", "corpus.jsonl", group_field="category")
    report = evaluate(pairs, group_field="category")
    print(report.table())
"""

from __future__ import annotations

import csv
import json
import os
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from rouge_score import rouge_scorer, tokenizers

from models import defaults
from models.errors import ConfigError, InputError, RowProblem
from models.text import is_cjk_text, lead
from producer.inputs import read_documents

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
LANGUAGES = ("auto", "en", "zh")
SHOWN = 5  # ids or rows named in one error message before "and N more"
_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
_KINDS |= {bool: "boolean", type(None): "null"}


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
    language: str  # "zh" when scored on characters, else "en"
    system: dict[str, Score]  # "rouge1", "rouge2", "rougeL"
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
        line = f"{{:<{w_name}}}  {{:<6}}  {{:>{w_n}}}  " + "  ".join([f"{{:<{w_cell}}}"] * 3)
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
        return "\n".join(out) + "\n"


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
    """Score `pairs` with ROUGE-1/2/L F1, overall and per `Pair.group`, with Lead-3 alongside.

    `language` "en" scores stemmed words, "zh" characters, "auto" picks "zh" when most
    references are CJK text. `bootstrap` resamples give each mean a 95% interval (0: none,
    low = mid = high); the same `seed` gives the same intervals. `group_field` only names the
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
        cjk = sum(is_cjk_text(p.reference) for p in pairs)
        language = "zh" if cjk * 2 > len(pairs) else "en"
    scorer = make_scorer(language)

    failed = np.array([not (p.summary or "").strip() for p in pairs])
    system = np.zeros((len(pairs), len(ROUGE_TYPES)))
    for i, p in enumerate(pairs):
        if not failed[i]:
            system[i] = _f1(scorer, p.reference, p.summary)
    has_doc = np.array([with_lead and bool((p.document or "").strip()) for p in pairs])
    lead_scores = np.zeros((len(pairs), len(ROUGE_TYPES)))
    for i, p in enumerate(pairs):
        if has_doc[i]:
            lead_scores[i] = _f1(scorer, p.reference, lead(p.document or "", defaults.LEAD_SENTENCES))

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


def make_scorer(language: str) -> rouge_scorer.RougeScorer:
    """The scorer for "en" (stemmed words) or "zh" (characters)."""
    if language == "zh":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _f1(scorer: rouge_scorer.RougeScorer, reference: str, summary: str) -> tuple[float, ...]:
    # rouge_score takes (target, prediction): the reference comes first.
    scores = scorer.score(reference, summary)
    return tuple(float(scores[t].fmeasure) for t in ROUGE_TYPES)


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
    return "characters" if language == "zh" else "words (Porter-stemmed)"


# -- loading pairs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Result:
    id: str
    summary: str
    line: int


def pairs_from_files(
    results_path: str,
    references_path: str,
    *,
    reference_field: str = "summary",
    text_field: str | None = None,
    group_field: str | None = None,
) -> list[Pair]:
    """Match the result rows of `results_path` with the references in the corpus `references_path`.

    `results_path` holds sumfleet result rows (`id`, `summary`, `status`, ...) as JSON Lines,
    or CSV when it ends in `.csv`. `references_path` is the input corpus in any format
    `read_documents` reads; each row's `reference_field` is its reference summary, its text is
    the document (for Lead-3), and `group_field`, if given, its group. Pairs come in the order
    of the results. Raises `InputError` naming file and line for a malformed result row, a
    duplicate result id, result ids the corpus lacks, a missing or empty reference, a group
    field no row has, or no result rows at all.
    """
    results = _read_results(results_path)
    if not results:
        raise InputError(f"{results_path}: no result rows; nothing to evaluate")
    wanted = {r.id for r in results}
    problems: list[RowProblem] = []
    docs = {doc.id: doc for doc in read_documents(references_path, problems, text_field=text_field) if doc.id in wanted}
    missing = [r for r in results if r.id not in docs]
    if missing:
        named = ", ".join(f'"{r.id}" (line {r.line})' for r in missing[:SHOWN])
        message = (
            f"{results_path}: {_count(len(missing), 'result id')} missing from {references_path}: "
            f"{named}{_more(len(missing))}"
        )
        if problems:
            message += f"; {_count(len(problems), 'row')} of {references_path} could not be read, first {problems[0]}"
        raise InputError(message, problems)

    bad: list[RowProblem] = []
    pairs = []
    for r in results:
        doc = docs[r.id]
        value = doc.meta.get(reference_field)
        if value is None:
            fields = ", ".join(sorted(doc.meta)) or "none"
            why = f'no reference field "{reference_field}" for id "{r.id}" (its fields: {fields})'
            bad.append(RowProblem(doc.source, doc.line, why))
            continue
        if isinstance(value, str) and not value.strip():
            why = f'empty reference field "{reference_field}" for id "{r.id}"'
            bad.append(RowProblem(doc.source, doc.line, why))
            continue
        if not isinstance(value, str):
            bad.append(
                RowProblem(
                    doc.source,
                    doc.line,
                    f'reference field "{reference_field}" for id "{r.id}" must be a string, '
                    f"got {_KINDS.get(type(value), type(value).__name__)}",
                )
            )
            continue
        group = doc.meta.get(group_field) if group_field else None
        pairs.append(Pair(r.id, r.summary, value, doc.text, _group(group)))
    if bad:
        raise InputError(_listing(f"{len(bad)} bad reference(s)", bad), bad)
    if group_field and all(p.group is None for p in pairs):
        raise InputError(f'{references_path}: no row has the group field "{group_field}"')
    return pairs


def pairs_from_rows(rows: Iterable[Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]]) -> list[Pair]:
    """Pairs from result rows (e.g. a finished batch read from the database) and references.

    `references` maps id -> {"reference": str, "document": str | None, "group": ... | None}.
    Raises `InputError` for result ids without a reference (up to 5 named), an empty
    reference, or no rows at all.
    """
    pairs: list[Pair] = []
    missing: list[str] = []
    empty: list[str] = []
    for row in rows:
        doc_id = str(row["id"])
        ref = references.get(doc_id)
        if ref is None:
            missing.append(doc_id)
            continue
        reference = ref.get("reference")
        if not isinstance(reference, str) or not reference.strip():
            empty.append(doc_id)
            continue
        document = ref.get("document")
        pairs.append(
            Pair(
                doc_id,
                row.get("summary") or "",
                reference,
                document if isinstance(document, str) else None,
                _group(ref.get("group")),
            )
        )
    if missing:
        named = ", ".join(f'"{i}"' for i in missing[:SHOWN])
        raise InputError(f"{_count(len(missing), 'result id')} with no reference: {named}{_more(len(missing))}")
    if empty:
        named = ", ".join(f'"{i}"' for i in empty[:SHOWN])
        raise InputError(f"{_count(len(empty), 'reference')} missing or empty: {named}{_more(len(empty))}")
    if not pairs:
        raise InputError("no result rows; nothing to evaluate")
    return pairs


def _read_results(path: str) -> list[_Result]:
    """The rows of a results file; every malformed row is collected, then one error raised."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    problems: list[RowProblem] = []
    results: list[_Result] = []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = _csv_rows(f) if path.lower().endswith(".csv") else _jsonl_rows(f)
            for line, row in rows:
                if isinstance(row, str):
                    problems.append(RowProblem(path, line, f"malformed result line ({row})"))
                    continue
                result = _check_result(row, line)
                if isinstance(result, str):
                    problems.append(RowProblem(path, line, f"malformed result line ({result})"))
                elif result.id in seen:
                    first = seen[result.id]
                    why = f'duplicate result id "{result.id}" (first at line {first})'
                    problems.append(RowProblem(path, line, why))
                else:
                    seen[result.id] = line
                    results.append(result)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    if problems:
        raise InputError(_listing(f"{len(problems)} bad result row(s)", problems), problems)
    return results


def _jsonl_rows(f: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, object) per non-blank line; the object is a string saying why when it is bad."""
    for n, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield n, f"malformed JSON: {e.msg} at column {e.colno}"
            continue
        except RecursionError:
            yield n, "malformed JSON: nested too deeply"
            continue
        if not isinstance(obj, dict):
            yield n, f"expected a JSON object, got {_KINDS.get(type(obj), 'a value')}"
            continue
        yield n, obj


def _csv_rows(f: Any) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line where the row starts, row) per CSV row after the header."""
    reader = csv.reader(f)
    header: list[str] | None = None
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            end = reader.line_num
            yield start, f"malformed CSV: {e}"
            continue
        end = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            continue
        if len(row) != len(header):
            yield start, f"expected {len(header)} fields, got {len(row)}"
            continue
        yield start, dict(zip(header, row, strict=True))


def _check_result(row: dict[str, Any], line: int) -> _Result | str:
    """A result from a row, or why the row is unusable."""
    if "id" not in row:
        return 'no "id" field'
    raw_id = row["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        kind = "empty" if isinstance(raw_id, str) else _KINDS.get(type(raw_id), "a value")
        return f'field "id" must be a non-empty string or integer, got {kind}'
    if "summary" not in row:
        return 'no "summary" field'
    summary = row["summary"]
    if summary is not None and not isinstance(summary, str):
        kind = _KINDS.get(type(summary), "a value")
        return f'field "summary" must be a string or null, got {kind}'
    return _Result(str(raw_id), summary or "", line)


def _group(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _more(n: int) -> str:
    return f" and {n - SHOWN} more" if n > SHOWN else ""


def _listing(what: str, problems: list[RowProblem]) -> str:
    """`what`: the first few problems, `; `-separated, then how many more."""
    if len(problems) == 1:
        return str(problems[0])
    shown = "; ".join(str(p) for p in problems[:SHOWN])
    return f"{what}: {shown}{_more(len(problems))}"
