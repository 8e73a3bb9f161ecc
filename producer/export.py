"""Writing result rows to JSONL or CSV, streamed (a million rows never sit in memory)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from models.errors import InputError
from producer.client import RESULT_FIELDS


def format_for(path: str, fmt: str | None) -> str:
    """`jsonl` or `csv`: given explicitly, else from the file extension (default jsonl)."""
    if fmt:
        if fmt not in ("jsonl", "csv"):
            raise InputError(f"unknown output format {fmt!r}: use jsonl or csv")
        return fmt
    return "csv" if path.lower().endswith(".csv") else "jsonl"


@contextmanager
def _open(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
        return
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise InputError(f"cannot write {path}: directory {target.parent} does not exist")
    with target.open("w", encoding="utf-8", newline="") as handle:
        yield handle


def write_results(rows: Iterable[dict[str, Any]], path: str, fmt: str | None = None) -> int:
    """Write rows to `path` (`-` is stdout); returns how many were written."""
    kind = format_for(path, fmt)
    count = 0
    with _open(path) as handle:
        if kind == "csv":
            writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
                count += 1
        else:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    return count
