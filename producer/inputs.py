"""Streaming readers for input corpora: JSON Lines, CSV/TSV, Parquet, a directory of text files,
a Hugging Face dataset saved with `save_to_disk`, stdin.

Every reader is a generator that reads one line (Parquet and datasets: one record batch) at a
time, so an input of millions of rows never sits in memory. A bad row does not stop the read:
it becomes a `RowProblem` appended to the caller's list and is skipped, so a user sees every
problem in one run and the caller decides whether to reject the input. A failure of the whole
input raises `InputError`.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from uuid import UUID

from models.defaults import MAX_ID_CHARS
from models.errors import InputError, RowProblem

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("jsonl", "csv", "tsv", "parquet", "dir", "hf")  # hf: a Hugging Face dataset saved with `save_to_disk`
TEXT_FIELDS = ("text", "document")  # JSONL keys tried for the text, in order
CSV_TEXT_COLUMNS = ("text", "document", "article", "content", "body")  # matched case-insensitively (also Parquet, hf)
DIR_SUFFIXES = (".txt", ".md")  # matched case-insensitively
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")  # a directory with one is an `hf` dataset
BATCH_ROWS = 256  # rows converted to Python at once from a Parquet file or a dataset's Arrow files
LINE_SLACK = 64 * 1024  # bytes a line may hold beyond 8 bytes per allowed character (ids, meta)

_BOM = b"\xef\xbb\xbf"
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what `surrogateescape` makes of undecodable bytes
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, lone surrogates (`\udXXX` in JSON): no database stores them
_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
_KINDS |= {bool: "boolean", type(None): "null"}  # JSON's names for the types `json` returns


@dataclass(frozen=True, slots=True)
class Document:
    """One document read from an input, with where it came from (for messages and results)."""

    id: str  # the row's id field, else its line number; in a directory, the relative path
    text: str  # surrounding whitespace stripped
    source: str  # the path as given, `<stdin>`, or the relative path inside a directory
    line: int | None  # 1-based line where the row starts (Parquet, hf: the row); None for a directory's files
    meta: dict[str, Any] = field(default_factory=dict)  # the row's other fields
    request: dict[str, Any] | None = None  # a chat request of its own (HTTP API): messages and settings


@dataclass(slots=True)
class _Ctx:
    """What every reader needs: where it reads, the caller's problem list, the options."""

    source: str
    problems: list[RowProblem]
    text_field: str | None
    id_field: str  # "id" unless the caller named one
    id_required: bool  # the caller named the id field: a row without it is bad, not numbered
    max_chars: int
    seen: dict[str, int] | None = None  # id -> line it was first seen at (None: the caller checks ids)

    def bad(self, line: int | None, reason: str) -> None:
        """Record a bad row (it is then skipped)."""
        self.problems.append(RowProblem(self.source, line, reason))

    def finish(
        self, line: int, doc_id: str, text: str, label: str, meta: dict[str, Any], id_label: str
    ) -> Document | None:
        """Check that a row's id is new and its text usable: the Document, or None once reported."""
        text = text.strip()
        why = row_problem(doc_id, text, self.max_chars, label, id_label, meta)
        if why is None:
            first = line if self.seen is None else self.seen.setdefault(doc_id, line)
            if first == line:
                return Document(doc_id, text, self.source, line, meta)
            why = duplicate_reason(doc_id, self.source, first)
        self.bad(line, why)
        return None


def unstorable(value: str) -> str | None:
    """Why no database can store `value` (a NUL character, an unpaired surrogate), or None."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    what = "a NUL character" if found.group() == chr(0) else "an unpaired surrogate"
    return f"holds {what} (\\u{ord(found.group()):04x}) at position {found.start()}"


def _unstorable_meta(meta: Mapping[str, Any]) -> str | None:
    """The first meta field (or nested value) that cannot be stored, described; or None."""
    stack: list[tuple[str, Any]] = list(meta.items())
    while stack:
        name, value = stack.pop()
        if why := unstorable(name):
            return f"a field name {why}"
        if isinstance(value, str) and (why := unstorable(value)):
            return f'field "{name}" {why}'
        if isinstance(value, float) and not math.isfinite(value):  # NaN, Infinity: JSON has no such numbers
            return f'field "{name}" is {value}, which JSON cannot store (use null or a number)'
        if isinstance(value, Mapping):
            stack.extend((f"{name}.{key}", inner) for key, inner in value.items())
        elif isinstance(value, list):
            stack.extend((f"{name}[{i}]", inner) for i, inner in enumerate(value))
    return None


def row_problem(
    doc_id: str,
    text: str,
    max_chars: int,
    label: str = "the text",
    id_label: str = "the id",
    meta: Mapping[str, Any] | None = None,
) -> str | None:
    """What makes a row unacceptable (the same rule for files, Python documents, the API,
    `run` on SQLite and `submit` on PostgreSQL), or None: an empty, over-long or unstorable id,
    an empty, over-long or unstorable text, an unstorable meta field."""
    if not doc_id.strip():
        return f"{id_label} is empty"
    if len(doc_id) > MAX_ID_CHARS:
        return f"{id_label} is {len(doc_id):,} characters; the limit is {MAX_ID_CHARS}"
    if why := unstorable(doc_id):
        return f"{id_label} {why}"
    if not text.strip():
        return f"{label} is empty"
    if len(text) > max_chars:
        return f"document is {len(text):,} characters; the limit is {max_chars:,}"
    if why := unstorable(text):
        return f"{label} {why}"
    return _unstorable_meta(meta) if meta else None


def read_documents(
    path: str,
    problems: list[RowProblem],
    *,
    fmt: str | None = None,
    text_field: str | None = None,
    id_field: str | None = None,
    max_chars: int = 1_000_000,
    stdin: BinaryIO | None = None,
    check_duplicates: bool = True,
) -> Iterator[Document]:
    """Stream the documents of `path` (a file, a directory, or `-` for stdin).

    Bad rows are appended to `problems` and skipped. A missing path or unknown `fmt` raises
    `InputError` at once, and so does a Parquet file or saved dataset that pyarrow (or its
    layout) rules out; failures found by reading (a JSON array, a CSV without a text column,
    an empty input) raise it while iterating. `fmt` None detects the format from the path: a
    directory holding `state.json`, `dataset_info.json` or `dataset_dict.json` is a Hugging Face
    dataset (`hf`), any other directory a tree of text files (`dir`), else `.csv`/`.tsv`/`.parquet`,
    else JSON Lines; a `.gz` suffix is read through gzip. Parquet files and datasets give their
    1-based row number as the line. `check_duplicates=False` leaves duplicate ids to the caller
    (which can check them in flat memory against the database: `models.job_writer`); the reader
    then keeps no id. With `id_field` None a row's `id` is used when it has one, else its line
    number; a named `id_field` must be in every row (a CSV header or Parquet schema without it
    is an error).
    """
    named = id_field is not None
    id_field = id_field or "id"
    seen: dict[str, int] | None = {} if check_duplicates else None
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f'{path}: unknown format "{fmt}" (expected one of: {", ".join(FORMATS)})')
    if path == "-":
        if fmt in ("dir", "hf"):
            raise InputError("<stdin>: a directory cannot be read from stdin")
        if fmt == "parquet":
            raise InputError("<stdin>: Parquet cannot be read from stdin (it is read from its end); give the file")
        ctx = _Ctx("<stdin>", problems, text_field, id_field, named, max_chars, seen)
        return _read_stream(stdin if stdin is not None else sys.stdin.buffer, fmt or "jsonl", ctx)
    ctx = _Ctx(path, problems, text_field, id_field, named, max_chars, seen)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if fmt is None:
            fmt = "hf" if any(os.path.isfile(os.path.join(path, m)) for m in HF_MARKERS) else "dir"
        if fmt == "hf":
            return _read_hf(path, ctx)
        if fmt != "dir":
            raise InputError(f'{path}: is a directory, but format "{fmt}" reads a file')
        return _read_dir(path, ctx)
    if fmt == "dir":
        raise InputError(f"{path}: not a directory")
    if fmt == "hf":
        raise InputError(
            f"{path}: not a directory (format hf reads the folder that `Dataset.save_to_disk` writes, "
            "holding state.json and data-*.arrow)"
        )
    name = path.lower()
    gz = name.endswith(".gz")
    ext = os.path.splitext(name.removesuffix(".gz"))[1]
    if fmt is None or (fmt == "csv" and ext == ".tsv"):
        fmt = EXTENSIONS.get(ext, fmt or "jsonl")
    if fmt == "parquet":
        if gz:
            raise InputError(f"{path}: a gzip-compressed Parquet file; Parquet compresses itself: gunzip it first")
        return _read_parquet(path, ctx)
    return _read_file(path, gz, fmt, ctx)


def _read_file(path: str, gz: bool, fmt: str, ctx: _Ctx) -> Iterator[Document]:
    """Open a file (through gzip if `gz`) and stream it; the file closes with the generator."""
    try:
        stream = cast(BinaryIO, gzip.open(path) if gz else open(path, "rb"))  # noqa: SIM115
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    with stream:
        yield from _read_stream(stream, fmt, ctx)


def _read_stream(stream: BinaryIO, fmt: str, ctx: _Ctx) -> Iterator[Document]:
    """Stream a JSONL or CSV/TSV byte stream; an input with nothing in it at all is an error."""
    before = len(ctx.problems)
    docs = _jsonl(stream, ctx) if fmt == "jsonl" else _csv(stream, ctx, "\t" if fmt == "tsv" else ",")
    found = False
    for doc in docs:
        found = True
        yield doc
    if not found and len(ctx.problems) == before:
        raise InputError(f"{ctx.source}: no documents (the file is empty)")


def _lines(stream: BinaryIO, ctx: _Ctx) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, bytes) per physical line, a leading BOM dropped.

    A line longer than any acceptable row could be is reported here and yielded as None,
    without ever being held whole, so one giant line cannot exhaust memory.
    """
    limit = 8 * ctx.max_chars + LINE_SLACK
    n = 0
    try:
        while raw := stream.readline(limit):
            n += 1
            if n == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise InputError(f"{ctx.source}: UTF-16 text; save it as UTF-8")
            if len(raw) >= limit and not raw.endswith(b"\n"):
                while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
                    pass
                ctx.bad(n, f"line is over {limit:,} bytes; the limit is {ctx.max_chars:,} characters")
                yield n, None
                continue
            yield n, raw[3:] if n == 1 and raw.startswith(_BOM) else raw
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated gzip file, an I/O error
        raise InputError(f"{ctx.source}: cannot read ({e})") from e


def _jsonl(stream: BinaryIO, ctx: _Ctx) -> Iterator[Document]:
    """Read JSON Lines: one object per line; blank lines are skipped."""
    started = False
    for n, raw in _lines(stream, ctx):
        if raw is None:
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            col = len(raw[: e.start].decode("utf-8", "replace")) + 1
            ctx.bad(n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})")
            continue
        if not line.strip():
            continue
        if not started:
            started = True
            if line.lstrip().startswith("["):
                src = ctx.source if ctx.source.lower().endswith(".json") else "file.json"
                raise InputError(
                    f"{ctx.source}: a JSON array, not JSON Lines (one object per line); "
                    f"convert it, e.g. `jq -c '.[]' {src} > {src[:-5]}.jsonl`"
                )
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            ctx.bad(n, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            ctx.bad(n, f"malformed JSON (a number of over {sys.get_int_max_str_digits():,} digits)")
            continue
        except RecursionError:
            ctx.bad(n, "malformed JSON (nested too deeply)")
            continue
        if not isinstance(obj, dict):
            kind = _KINDS[type(obj)]
            ctx.bad(n, f"expected a JSON object, got {kind if obj is None else 'a ' + kind}")
            continue
        key = ctx.text_field or next(filter(obj.__contains__, TEXT_FIELDS), None)
        if key is None or key not in obj:
            keys = [ctx.text_field] if ctx.text_field else TEXT_FIELDS
            wanted = " or ".join(f'"{k}"' for k in keys)
            ctx.bad(n, f"missing text: no {wanted} field")
            continue
        if not isinstance(text := obj[key], str):
            ctx.bad(n, f'field "{key}" must be a string, got {_KINDS[type(text)]}')
            continue
        if ctx.id_required and ctx.id_field not in obj:
            ctx.bad(n, f'no "{ctx.id_field}" field (the id field given)')
            continue
        raw_id = obj.get(ctx.id_field, n)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            kind = _KINDS[type(raw_id)]
            ctx.bad(n, f'field "{ctx.id_field}" must be a string or integer, got {kind}')
            continue
        meta = {k: v for k, v in obj.items() if k != key and k != ctx.id_field}
        if doc := ctx.finish(n, str(raw_id), text, f'field "{key}"', meta, f'field "{ctx.id_field}"'):
            yield doc


def _column(header: list[str], name: str) -> int | None:
    """Index of column `name` in the header: an exact match, else a case-insensitive one."""
    if name in header:
        return header.index(name)
    folded = [h.casefold() for h in header]
    return folded.index(name.casefold()) if name.casefold() in folded else None


def _csv(stream: BinaryIO, ctx: _Ctx, delimiter: str) -> Iterator[Document]:
    """Read CSV/TSV with a header row; a quoted field may span lines.

    Each physical line is decoded with `surrogateescape`, so a bad byte survives parsing
    and is reported with its row and column instead of failing the whole file.
    """
    overlong: list[int] = []  # lines `_lines` dropped; a row spanning one is skipped

    def text_lines() -> Iterator[str]:
        for n, raw in _lines(stream, ctx):
            if raw is None:
                overlong.append(n)
            yield "\n" if raw is None else raw.decode("utf-8", "surrogateescape")

    field_limit = max(csv.field_size_limit(), 2 * ctx.max_chars + LINE_SLACK)
    csv.field_size_limit(field_limit)  # process-wide, so only ever raised
    if delimiter == "\t":  # TSV has no quoting: a quote is a character of its field
        reader = csv.reader(text_lines(), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    else:  # strict: a quote never closed is an error, not the rest of the file read as one field
        reader = csv.reader(text_lines(), delimiter=delimiter, strict=True)
    try:
        header = next((row for row in reader if row), None)
    except csv.Error as e:
        raise InputError(f"{ctx.source}: malformed CSV header ({e})") from e
    if header is None:
        return  # empty: `_read_stream` reports it
    if any(_BAD_BYTE.search(h) for h in header):
        raise InputError(f"{ctx.source}: the header row is not valid UTF-8")
    header = [h.strip() for h in header]
    columns = ", ".join(header)
    if ctx.text_field:
        ti = _column(header, ctx.text_field)
        if ti is None:
            raise InputError(f'{ctx.source}: no column "{ctx.text_field}" (the columns are: {columns})')
    else:
        ti = next((i for c in CSV_TEXT_COLUMNS if (i := _column(header, c)) is not None), None)
        if ti is None:
            raise InputError(
                f"{ctx.source}: no text column (looked for {', '.join(CSV_TEXT_COLUMNS)}); "
                f"the columns are: {columns}. Pass the text column with --text-field "
                "(or is the header row missing?)"
            )
    ii = _column(header, ctx.id_field)
    if ii is None and ctx.id_required:
        raise InputError(f'{ctx.source}: no id column "{ctx.id_field}" (the columns are: {columns})')
    label = f'column "{header[ti]}"'
    before, found = len(ctx.problems), False
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = reader.line_num
            if "field larger than field limit" in str(e):
                why = f"a field is over {field_limit:,} characters; the limit is {ctx.max_chars:,}"
            elif "unexpected end of data" in str(e):
                why = f"a quoted field is never closed (lines {start}-{end}, the end of the file, would be one field)"
            else:
                why = f"malformed CSV ({e})"
            ctx.bad(start, why)
            continue
        end = reader.line_num
        if not any(f.strip() for f in row) or (overlong and overlong[-1] >= start):
            continue  # a blank line, or a row already reported as overlong
        if len(row) != len(header):
            ctx.bad(start, f"expected {len(header)} fields, got {len(row)}")
            continue
        if bad := next(((j, m) for j, f in enumerate(row) if (m := _BAD_BYTE.search(f))), None):
            j, m = bad
            byte = ord(m.group()) - 0xDC00
            ctx.bad(start, f'not valid UTF-8 (byte 0x{byte:02x} in column "{header[j]}")')
            continue
        doc_id = row[ii] if ii is not None else str(start)
        meta = {h: v for j, (h, v) in enumerate(zip(header, row, strict=True)) if j != ti and j != ii}
        if doc := ctx.finish(start, doc_id, row[ti], label, meta, f'column "{ctx.id_field}"'):
            found = True
            yield doc
    if not found and len(ctx.problems) == before:
        raise InputError(f"{ctx.source}: no documents (the file has only a header row)")


def _walk(root: str, prefix: str = "") -> Iterator[str]:
    """Yield the relative paths (with `/`) of the .txt/.md files under `root`, sorted.

    Hidden names (a leading `.`) are skipped; symlinked directories are not followed (no loops).
    """
    with os.scandir(os.path.join(root, prefix)) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        rel = f"{prefix}/{e.name}" if prefix else e.name
        if e.is_dir(follow_symlinks=False):
            yield from _walk(root, rel)
        elif e.is_file() and e.name.lower().endswith(DIR_SUFFIXES):
            yield rel


def _load(full: str, max_chars: int) -> tuple[str, str | None]:
    """Read one file of a directory: (its stripped text, None), or ("", what is wrong with it)."""
    try:
        size = os.stat(full).st_size
        if size > 4 * max_chars:  # over 4 bytes a character: certainly too long, so not read
            return "", f"file is {size:,} bytes; the limit is {max_chars:,} characters"
        with open(full, "rb") as f:
            data = f.read()
    except OSError as e:
        return "", f"cannot read ({e.strerror or e})"
    try:
        if b"\0" in data:
            raise ValueError
        text = data.removeprefix(_BOM).decode("utf-8").strip()
    except ValueError:  # UnicodeDecodeError is one
        return "", "binary file (not UTF-8 text)"
    if not text:
        return "", "file is empty"
    if len(text) > max_chars:
        return "", f"document is {len(text):,} characters; the limit is {max_chars:,}"
    return text, None


def _read_dir(root: str, ctx: _Ctx) -> Iterator[Document]:
    """Read each .txt/.md file under a directory as one document, id = its relative path."""
    found = False
    try:
        for rel in _walk(root):
            found = True
            text, why = _load(os.path.join(root, rel), ctx.max_chars)
            if why:
                ctx.problems.append(RowProblem(rel, None, why))
            else:
                yield Document(rel, text, rel, None, {})
    except OSError as e:  # a directory that cannot be listed
        raise InputError(f"{root}: cannot read directory ({e})") from e
    if not found:
        raise InputError(f"{root}: no .txt or .md files in the directory (hidden ones are skipped)")


# -- Parquet files and saved Hugging Face datasets: Arrow record batches ---------------------------


class _NoJson(Exception):
    """A meta value with no JSON form; the message names the column (and the place inside it)."""


@dataclass(frozen=True, slots=True)
class _Columns:
    """Which columns of an Arrow schema hold the text and the id; the rest go to meta."""

    names: list[str]
    text: int
    id: int | None
    labels: dict[str, list[str]]  # a dataset's ClassLabel columns: the names their integers stand for


def _pyarrow(what: str) -> Any:
    """The pyarrow module with `ipc` and `parquet` loaded, or `InputError` saying how to install it."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{what} needs pyarrow: pip install 'sumfleet[parquet]'") from None
    return pyarrow


def _is_text_type(pa: Any, kind: Any) -> bool:
    """Whether an Arrow column type can hold the text: strings, UTF-8 bytes, or all nulls."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    names = ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view")
    checks = [getattr(pa.types, name, None) for name in (*names, "is_null")]  # the views: pyarrow 16 and later
    return any(check(kind) for check in checks if check is not None)


def _columns(pa: Any, schema: pa.Schema, ctx: _Ctx, labels: dict[str, list[str]]) -> _Columns:
    """Find the text and id columns of `schema` by the CSV rules; `InputError` if there is no usable one."""
    names = [str(name) for name in schema.names]
    listed = ", ".join(names)
    if ctx.text_field:
        ti = _column(names, ctx.text_field)
        if ti is None:
            raise InputError(f'{ctx.source}: no column "{ctx.text_field}" (the columns are: {listed})')
    else:
        ti = next((i for c in CSV_TEXT_COLUMNS if (i := _column(names, c)) is not None), None)
        if ti is None:
            raise InputError(
                f"{ctx.source}: no text column (looked for {', '.join(CSV_TEXT_COLUMNS)}); "
                f"the columns are: {listed}. Pass the text column with --text-field"
            )
    kind = schema.field(ti).type
    if not _is_text_type(pa, kind):
        raise InputError(
            f'{ctx.source}: column "{names[ti]}" holds {kind} values, not text; '
            f"pass the text column with --text-field (the columns are: {listed})"
        )
    ii = _column(names, ctx.id_field)
    if ii is None and ctx.id_required:
        raise InputError(f'{ctx.source}: no id column "{ctx.id_field}" (the columns are: {listed})')
    return _Columns(names, ti, ii, labels)


def _json_value(value: Any, name: str) -> Any:
    """`value` (as pyarrow's `to_pylist` gives it) in a form JSON stores, or `_NoJson` saying why not.

    Timestamps, dates and times become ISO 8601 strings, durations seconds, decimals exact strings,
    UTF-8 bytes strings, NaN null (a missing value, as pandas writes it), an Arrow map with string
    keys an object; infinities and bytes that are not UTF-8 have no JSON form.
    """
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    if isinstance(value, float):
        if value != value:
            return None
        if value in (float("inf"), float("-inf")):
            raise _NoJson(f'column "{name}" is {value} (JSON has no infinity)')
        return value
    if isinstance(value, (datetime, date, time)):  # a pandas Timestamp is a datetime
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)  # a float could round it
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _NoJson(f'column "{name}" holds binary data that is not UTF-8 text') from None
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
            return {k: _json_value(v, f"{name}.{k}") for k, v in value}  # an Arrow map: (key, value) pairs
        return [_json_value(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise _NoJson(f'column "{name}" holds a {type(value).__name__} value, which has no JSON form')


def _arrow_rows(pa: Any, batches: Iterator[pa.RecordBatch], cols: _Columns, ctx: _Ctx, what: str) -> Iterator[Document]:
    """Documents from record batches: row N (1-based, across batches and files) is line N."""
    label = f'column "{cols.names[cols.text]}"'
    id_label = f'column "{cols.names[cols.id] if cols.id is not None else ctx.id_field}"'
    meta_columns = [i for i in range(len(cols.names)) if i not in (cols.text, cols.id)]
    before, n = len(ctx.problems), 0
    for batch in batches:
        values: list[list[Any]] = []
        for i in range(batch.num_columns):
            column, kind = batch.column(i), batch.schema.field(i).type
            if (pa.types.is_timestamp(kind) or pa.types.is_duration(kind)) and kind.unit == "ns":
                # Python's datetime and timedelta hold microseconds (pandas' Timestamp, not always there, holds ns)
                micro = pa.timestamp("us", kind.tz) if pa.types.is_timestamp(kind) else pa.duration("us")
                column = column.cast(micro, safe=False)
            try:
                values.append(column.to_pylist())
            except Exception as e:  # pyarrow cannot make Python values of it (an unknown time zone, ...)
                raise InputError(f'{ctx.source}: column "{cols.names[i]}" cannot be read ({e})') from e
        for row in zip(*values, strict=True):
            n += 1
            text = row[cols.text]
            if text is None:
                ctx.bad(n, f"{label} is null")
                continue
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    ctx.bad(n, f"{label} is not valid UTF-8 (byte 0x{text[e.start]:02x} at offset {e.start})")
                    continue
            if cols.id is None:
                doc_id = str(n)
            elif (raw_id := row[cols.id]) is None:
                ctx.bad(n, f"{id_label} is null")
                continue
            elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                ctx.bad(n, f"{id_label} must be a string or integer, got {type(raw_id).__name__}")
                continue
            else:
                doc_id = str(raw_id)
            try:
                meta = {cols.names[i]: _meta_value(row[i], cols.names[i], cols.labels) for i in meta_columns}
            except _NoJson as e:
                ctx.bad(n, str(e))
                continue
            if doc := ctx.finish(n, doc_id, text, label, meta, id_label):
                yield doc
    if n == 0 and len(ctx.problems) == before:
        raise InputError(f"{ctx.source}: no documents (the {what} has no rows)")


def _meta_value(value: Any, name: str, labels: dict[str, list[str]]) -> Any:
    """A meta column's value for JSON; a ClassLabel integer of a dataset becomes its label's name."""
    names = labels.get(name)
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return _json_value(value, name)


def _read_parquet(path: str, ctx: _Ctx) -> Iterator[Document]:
    """Open a Parquet file and find its columns now; its rows stream `BATCH_ROWS` at a time."""
    pa = _pyarrow("Parquet input")
    try:
        parquet = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e
    try:
        cols = _columns(pa, parquet.schema_arrow, ctx, {})
    except BaseException:
        parquet.close()
        raise
    return _parquet_rows(pa, parquet, cols, ctx)


def _parquet_rows(pa: Any, parquet: Any, cols: _Columns, ctx: _Ctx) -> Iterator[Document]:
    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from parquet.iter_batches(batch_size=BATCH_ROWS)
        except (pa.ArrowException, OSError) as e:  # a corrupt page, a truncated file
            raise InputError(f"{ctx.source}: cannot read ({e})") from e

    with parquet:
        yield from _arrow_rows(pa, batches(), cols, ctx, "file")


def _json_file(path: str) -> dict[str, Any]:
    """A JSON object read from `path` (a saved dataset's state.json, ...), or `InputError`."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def _class_labels(info_path: str) -> dict[str, list[str]]:
    """The ClassLabel columns listed in a dataset's dataset_info.json, with their names."""
    if not os.path.isfile(info_path):
        return {}
    features = _json_file(info_path).get("features")
    if not isinstance(features, dict):
        return {}
    return {
        str(name): [str(label) for label in spec["names"]]
        for name, spec in features.items()
        if isinstance(spec, dict) and spec.get("_type") == "ClassLabel" and isinstance(spec.get("names"), list)
    }


@contextmanager
def _arrow_batches(pa: Any, path: str) -> Iterator[tuple[Any, Iterator[pa.RecordBatch]]]:
    """(schema, record batches) of one of a dataset's .arrow files: the IPC stream format that
    `save_to_disk` writes, or the IPC file format; the file is memory-mapped, not read whole."""
    try:
        source = pa.memory_map(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read ({e})") from e
    with source:
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            try:
                reader = pa.ipc.open_file(source)
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{path}: not an Arrow file ({e})") from e
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield reader.schema, batches


def _read_hf(path: str, ctx: _Ctx) -> Iterator[Document]:
    """Check a folder written by `Dataset.save_to_disk` and find its columns now; its rows stream later.

    Its state.json lists its data-*.arrow files in order; each is read with pyarrow, record batch by
    record batch, so the `datasets` package is not needed. A `DatasetDict` folder (dataset_dict.json
    and a folder per split) is refused with its splits named: give the split's folder, `path/train`.
    """
    listing = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(listing):
        splits = _json_file(listing).get("splits")
        if not isinstance(splits, list) or not splits:
            raise InputError(f"{listing}: lists no splits")
        example = os.path.join(path, str(splits[0]))
        raise InputError(
            f"{path}: a DatasetDict with splits {', '.join(map(str, splits))}; give the folder of one split, "
            f"e.g. {example}"
        )
    state_path = os.path.join(path, "state.json")
    if not os.path.isfile(state_path):
        raise InputError(
            f"{path}: no state.json, so not a folder written by `Dataset.save_to_disk` "
            "(give --format dir to read its .txt/.md files)"
        )
    files = _json_file(state_path).get("_data_files")
    names = [f.get("filename") if isinstance(f, dict) else None for f in files] if isinstance(files, list) else []
    if not names or not all(isinstance(name, str) and name and os.path.basename(name) == name for name in names):
        raise InputError(f'{state_path}: no list of data files ("_data_files" with file names in the folder)')
    shards = [os.path.join(path, cast(str, name)) for name in names]
    for shard in shards:
        if not os.path.isfile(shard):
            raise InputError(f"{shard}: no such file (listed in {state_path})")
    pa = _pyarrow("Reading a Hugging Face dataset")
    with _arrow_batches(pa, shards[0]) as (schema, _):
        pass
    cols = _columns(pa, schema, ctx, _class_labels(os.path.join(path, "dataset_info.json")))
    return _hf_rows(pa, shards, schema, cols, ctx)


def _hf_rows(pa: Any, shards: list[str], schema: Any, cols: _Columns, ctx: _Ctx) -> Iterator[Document]:
    def batches() -> Iterator[pa.RecordBatch]:
        for shard in shards:
            with _arrow_batches(pa, shard) as (shard_schema, shard_batches):
                if not shard_schema.equals(schema):
                    raise InputError(f"{shard}: its columns differ from those of {shards[0]}")
                try:
                    yield from shard_batches
                except (pa.ArrowException, OSError) as e:
                    raise InputError(f"{shard}: cannot read ({e})") from e

    yield from _arrow_rows(pa, batches(), cols, ctx, "dataset")


def python_documents(
    documents: Iterable[str | Mapping[str, Any]],
    problems: list[RowProblem],
    max_chars: int,
    check_duplicates: bool = True,
) -> Iterator[Document]:
    """Documents given in Python (strings, or mappings with `text`/`document` and an optional `id`),
    checked like a file's rows; bad ones go to `problems` as `<python>:N` (N counts from 1).
    `check_duplicates=False`: as for `read_documents`."""
    seen: dict[str, int] | None = {} if check_duplicates else None
    for number, item in enumerate(documents, start=1):

        def bad(reason: str, number: int = number) -> None:
            problems.append(RowProblem("<python>", number, reason))

        if isinstance(item, str):
            text, doc_id, meta = item, str(number), {}
        elif isinstance(item, Mapping):
            key = "text" if "text" in item else "document"
            given = item.get(key)
            raw_id = item.get("id", number)
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                bad(f'field "id" must be a string or integer, got {type(raw_id).__name__}')
                continue
            doc_id = str(raw_id)
            meta = {k: v for k, v in item.items() if k not in (key, "id")}
            if not isinstance(given, str):
                bad(
                    'missing text: no "text" or "document" string'
                    if given is None
                    else f'field "{key}" must be a string, got {type(given).__name__}'
                )
                continue
            text = given
        else:
            bad(f"expected a string or a mapping, got {type(item).__name__}")
            continue
        if why := row_problem(doc_id, text, max_chars, id_label='field "id"', meta=meta):
            bad(why)
        elif seen is not None and doc_id in seen:
            bad(duplicate_reason(doc_id, "<python>", seen[doc_id]))
        else:
            if seen is not None:
                seen[doc_id] = number
            yield Document(id=doc_id, text=text, source="<python>", line=number, meta=meta)


def duplicate_reason(doc_id: str, source: str, first: int | None) -> str:
    """The bad-row reason for an id seen before (Python documents count items, files lines)."""
    unit = "item" if source == "<python>" else "line"
    return f'duplicate id "{doc_id}" (first seen at {unit} {first})'
