"""Streaming readers for input corpora: JSON Lines, CSV/TSV, a directory of text files, stdin.

Every reader is a generator that reads one line at a time, so an input of millions of rows
never sits in memory. A bad row does not stop the read: it becomes a `RowProblem` appended
to the caller's list and is skipped, so a user sees every problem in one run and the caller
decides whether to reject the input. A failure of the whole input raises `InputError`.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from models.defaults import MAX_ID_CHARS
from models.errors import InputError, RowProblem

FORMATS = ("jsonl", "csv", "tsv", "dir")
TEXT_FIELDS = ("text", "document")  # JSONL keys tried for the text, in order
CSV_TEXT_COLUMNS = ("text", "document", "article", "content", "body")  # matched case-insensitively
DIR_SUFFIXES = (".txt", ".md")  # matched case-insensitively
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
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
    line: int | None  # 1-based line where the row starts; None for a directory's files
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
    `InputError` at once; failures found by reading (a JSON array, a CSV without a text
    column, an empty input) raise it while iterating. `fmt` None detects the format from the
    path: a directory, else `.csv`/`.tsv`, else JSON Lines; a `.gz` suffix is read through gzip.
    `check_duplicates=False` leaves duplicate ids to the caller (which can check them in flat
    memory against the database: `models.job_writer`); the reader then keeps no id. With
    `id_field` None a row's `id` is used when it has one, else its line number; a named
    `id_field` must be in every row (a CSV header without it is an error).
    """
    named = id_field is not None
    id_field = id_field or "id"
    seen: dict[str, int] | None = {} if check_duplicates else None
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f'{path}: unknown format "{fmt}" (expected one of: {", ".join(FORMATS)})')
    if path == "-":
        if fmt == "dir":
            raise InputError("<stdin>: a directory cannot be read from stdin")
        ctx = _Ctx("<stdin>", problems, text_field, id_field, named, max_chars, seen)
        return _read_stream(stdin if stdin is not None else sys.stdin.buffer, fmt or "jsonl", ctx)
    ctx = _Ctx(path, problems, text_field, id_field, named, max_chars, seen)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if fmt not in (None, "dir"):
            raise InputError(f'{path}: is a directory, but format "{fmt}" reads a file')
        return _read_dir(path, ctx)
    if fmt == "dir":
        raise InputError(f"{path}: not a directory")
    name = path.lower()
    gz = name.endswith(".gz")
    ext = os.path.splitext(name.removesuffix(".gz"))[1]
    if fmt is None or (fmt == "csv" and ext == ".tsv"):
        fmt = EXTENSIONS.get(ext, fmt or "jsonl")
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
