"""ROUGE evaluation of a batch's summaries against reference summaries, with a Lead-3 baseline.

Scores are ROUGE-1, ROUGE-2 and ROUGE-L F1 from Google's `rouge_score` package and ROUGE-Lsum F1
(`models.scoring.rouge_lsum`: sentences split first, union LCS per reference sentence, the variant
CNN/DailyMail papers report; ROUGE-L is one LCS over the whole text), averaged over documents,
each with a 95% bootstrap interval (documents resampled with replacement). English is scored on
Porter-stemmed words (`rouge_score`'s own tokenizer); Chinese (and Japanese) on characters,
because `rouge_score`'s tokenizer keeps only ASCII letters and digits and so would score any CJK
text 0.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from models.errors import InputError, RowProblem
from models.scoring import CharTokenizer, EvalReport, Pair, Score, evaluate, make_scorer
from producer.inputs import read_documents

__all__ = [
    "CharTokenizer",
    "EvalReport",
    "Pair",
    "Score",
    "evaluate",
    "make_scorer",
    "pairs_from_files",
    "pairs_from_rows",
]

SHOWN = 5  # ids or rows named in one error message before "and N more"
_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
_KINDS |= {bool: "boolean", type(None): "null"}


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
