"""Writing result rows to JSONL, CSV or Parquet, streamed (a million rows never sit in memory).

Parquet needs pyarrow (`pip install "sumfleet[parquet]"`); it is written in row groups of
`PARQUET_ROWS`, with typed columns (integers, floats, UTC timestamps, `warnings` a list of
strings). JSONL keeps `warnings` a list; CSV, which has no lists, joins it with `;` (an empty
cell: no warnings, or none recorded).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from models.errors import InputError
from producer.client import RESULT_FIELDS

FORMATS = ("jsonl", "csv", "parquet")
SUFFIXES = {"": "jsonl", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
PARQUET_ROWS = 10_000  # rows per Parquet row group (what is held in memory at once)
_INTEGERS = ("prompt_tokens", "output_tokens", "pieces", "levels", "attempts")
_MOMENTS = ("queued_at", "started_at", "finished_at")
_LISTS = ("warnings",)  # lists of strings: `;`-joined in CSV


def format_for(path: str, fmt: str | None) -> str:
    """`jsonl`, `csv` or `parquet`: given explicitly, else from the file extension (default jsonl)."""
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"unknown output format {fmt!r}: use {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if path != "-" and suffix not in SUFFIXES:
        known = ", ".join(s for s in SUFFIXES if s)
        raise InputError(f"cannot tell the output format of {path} from {suffix!r}: name it {known}, or give --format")
    return SUFFIXES[suffix] if path != "-" else "jsonl"


def check_output(path: str, fmt: str | None = None) -> str:
    """The output format, once `path` is known to be writable; else `InputError` saying why.

    Checked before any work, so a run over a whole corpus never ends in an unwritable path.
    A file this check creates is removed again.
    """
    kind = format_for(path, fmt)
    if path == "-":
        return kind
    target = Path(path)
    if target.is_dir():
        raise InputError(f"cannot write {path}: it is a directory; give a file name")
    if not target.parent.exists():
        raise InputError(f"cannot write {path}: directory {target.parent} does not exist")
    existed = target.exists()
    try:
        with target.open("a"):
            pass
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    if not existed:
        target.unlink(missing_ok=True)
    return kind


@contextmanager
def _open(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
        return
    check_output(path)
    try:
        handle = Path(path).open("w", encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    with handle:
        yield handle


def write_results(rows: Iterable[dict[str, Any]], path: str, fmt: str | None = None) -> int:
    """Write rows to `path` (`-` is stdout); returns how many were written."""
    kind = format_for(path, fmt)
    if kind == "parquet":
        return _write_parquet(rows, path)
    count = 0
    with _open(path) as handle:
        if kind == "csv":
            writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, **{name: _joined(row.get(name)) for name in _LISTS}})
                count += 1
        else:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    return count


def _write_parquet(rows: Iterable[dict[str, Any]], path: str) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError('Parquet output needs pyarrow: pip install "sumfleet[parquet]"') from None
    if path == "-":
        raise InputError("Parquet cannot go to stdout: give a file name (-o results.parquet)")
    check_output(path, "parquet")
    target = Path(path)
    types = {name: pa.string() for name in RESULT_FIELDS}
    types |= {name: pa.int64() for name in _INTEGERS} | {"generation_seconds": pa.float64()}
    types |= {name: pa.timestamp("us", tz="UTC") for name in _MOMENTS}
    types |= {name: pa.list_(pa.string()) for name in _LISTS}
    schema = pa.schema([(name, types[name]) for name in RESULT_FIELDS])
    count = 0
    with pq.ParquetWriter(target, schema) as writer:
        group: list[dict[str, Any]] = []
        for row in rows:
            group.append({**row, **{m: row[m] and datetime.fromisoformat(row[m]) for m in _MOMENTS}})
            if len(group) == PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                count += len(group)
                group = []
        if group or count == 0:
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
            count += len(group)
    return count


def _joined(values: list[str] | None) -> str | None:
    """A list of short codes as one CSV cell: `echo;truncated` (None stays an empty cell)."""
    return None if values is None else ";".join(values)
