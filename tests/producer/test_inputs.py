"""Tests for the streaming corpus readers in `producer.inputs`."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest

from models.errors import InputError, RowProblem
from producer.inputs import Document, read_documents


def write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read(path: str, **kw: object) -> tuple[list[Document], list[RowProblem]]:
    problems: list[RowProblem] = []
    return list(read_documents(path, problems, **kw)), problems  # type: ignore[arg-type]


def only_problem(problems: list[RowProblem], source: str, line: int | None, *words: str) -> None:
    assert len(problems) == 1, problems
    p = problems[0]
    assert (p.source, p.line) == (source, line), p
    for w in words:
        assert w in p.reason, (w, p.reason)


class Endless(io.RawIOBase):
    """An endless stream of rows that counts the bytes handed out: proves a reader streams."""

    def __init__(self, first: bytes, row: bytes) -> None:
        self.pending, self.row, self.given = first, row, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        while len(self.pending) < len(b):
            self.pending += self.row
        n = len(b)
        b[:n], self.pending = self.pending[:n], self.pending[n:]
        self.given += n
        return n


# --- JSON Lines: the good path ---


def test_jsonl_ids_meta_lines_and_order(tmp_path: Path) -> None:
    data = (
        jsonl({"id": "a1", "text": "  first  ", "lang": "en"}, {"id": 7, "text": "second"})
        + "\n   \n"
        + jsonl({"document": "third", "n": [1, 2]})
    )
    docs, problems = read(write(tmp_path / "c.jsonl", data))
    assert problems == []
    src = str(tmp_path / "c.jsonl")
    assert docs == [
        Document("a1", "first", src, 1, {"lang": "en"}),
        Document("7", "second", src, 2, {}),
        Document("5", "third", src, 5, {"n": [1, 2]}),
    ]


def test_jsonl_custom_text_and_id_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "c.ndjson", jsonl({"key": "k", "body": "hello", "text": "other"}))
    docs, problems = read(path, text_field="body", id_field="key")
    assert problems == []
    assert docs == [Document("k", "hello", path, 1, {"text": "other"})]


def test_jsonl_strips_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", b"\xef\xbb\xbf" + jsonl({"text": "x"}).encode())
    docs, problems = read(path)
    assert problems == [] and docs[0].text == "x"


def test_utf16_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="UTF-16"):
        read(write(tmp_path / "c.csv", "text\nhello\n".encode("utf-16")))


def test_unknown_extension_and_no_extension_read_as_jsonl(tmp_path: Path) -> None:
    for name in ("data.txt", "data"):
        docs, _ = read(write(tmp_path / name, jsonl({"text": "x"})))
        assert [d.text for d in docs] == ["x"]


def test_bad_rows_are_skipped_and_later_rows_still_read(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n{oops\n{"text": "b"}\n')
    docs, problems = read(path)
    assert [(d.text, d.line) for d in docs] == [("a", 1), ("b", 3)]
    only_problem(problems, path, 2, "malformed JSON")


# --- JSON Lines: bad rows ---


def test_jsonl_malformed(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a" "id": 1}\n')
    only_problem(read(path)[1], path, 1, "malformed JSON (Expecting ',' delimiter at column 14)")


def test_jsonl_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n"just a string"\nnull\n')
    problems = read(path)[1]
    assert [(p.line, p.reason) for p in problems] == [
        (2, "expected a JSON object, got a string"),
        (3, "expected a JSON object, got null"),
    ]


def test_jsonl_missing_text(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", jsonl({"id": "x", "title": "t"}))
    only_problem(read(path)[1], path, 1, 'missing text: no "text" or "document" field')
    only_problem(read(path, text_field="body")[1], path, 1, 'missing text: no "body" field')


def test_jsonl_text_not_a_string(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", jsonl({"text": 3}))
    only_problem(read(path)[1], path, 1, 'field "text" must be a string, got number')


def test_jsonl_empty_text(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", jsonl({"text": " \n\t "}))
    only_problem(read(path)[1], path, 1, 'field "text" is empty')


def test_jsonl_invalid_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", b'{"text": "\xc3\xa9\xff"}\n')
    only_problem(read(path)[1], path, 1, "not valid UTF-8 (byte 0xff at column 12)")


def test_jsonl_unpaired_surrogate_escape(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a\\udc80b"}\n')
    only_problem(read(path)[1], path, 1, 'field "text"', "unpaired surrogate")


def test_jsonl_too_long(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", jsonl({"text": "x" * 1234}))
    only_problem(read(path, max_chars=1000)[1], path, 1, "document is 1,234 characters; the limit is 1,000")


def test_jsonl_giant_line_is_not_held(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "' + "x" * 200_000 + '"}\n' + jsonl({"text": "ok"}))
    docs, problems = read(path, max_chars=10)
    assert [(d.text, d.line) for d in docs] == [("ok", 2)]
    only_problem(problems, path, 1, "line is over", "bytes")


def test_jsonl_bad_id(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.jsonl",
        jsonl({"id": [1], "text": "a"}, {"id": "", "text": "b"}, {"id": True, "text": "c"}),
    )
    problems = read(path)[1]
    assert [(p.line, p.reason) for p in problems] == [
        (1, 'field "id" must be a string or integer, got list'),
        (2, 'field "id" is empty'),
        (3, 'field "id" must be a string or integer, got boolean'),
    ]


def test_jsonl_duplicate_id(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.jsonl",
        jsonl({"text": "x"}, {"text": "y"}, {"id": "a1", "text": "a"}, {"id": "a1", "text": "b"}),
    )
    docs, problems = read(path)
    assert [d.id for d in docs] == ["1", "2", "a1"]
    only_problem(problems, path, 4, 'duplicate id "a1" (first seen at line 3)')


# --- whole-input failures ---


def test_json_array_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "c.json", '\n  [{"text": "a"},\n {"text": "b"}]\n')
    with pytest.raises(InputError, match="a JSON array, not JSON Lines") as e:
        read(path)
    assert path in str(e.value) and "jq -c '.[]'" in str(e.value)


def test_missing_path() -> None:
    with pytest.raises(InputError, match=r"no-such\.jsonl: no such file"):
        read_documents("no-such.jsonl", [])


def test_unknown_format(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", jsonl({"text": "a"}))
    with pytest.raises(InputError, match='unknown format "xml"'):
        read_documents(path, [], fmt="xml")
    with pytest.raises(InputError, match="not a directory"):
        read_documents(path, [], fmt="dir")
    with pytest.raises(InputError, match="is a directory"):
        read_documents(str(tmp_path), [], fmt="jsonl")


@pytest.mark.parametrize("data", ["", "\n  \n", "\xef\xbb\xbf"])
def test_empty_file(tmp_path: Path, data: str) -> None:
    path = write(tmp_path / "c.jsonl", data.encode("latin-1"))
    with pytest.raises(InputError, match=r"no documents \(the file is empty\)"):
        read(path)


def test_all_rows_bad_is_not_empty(tmp_path: Path) -> None:
    docs, problems = read(write(tmp_path / "c.jsonl", "{\n"))
    assert docs == [] and len(problems) == 1


# --- CSV / TSV ---


def test_csv_multiline_field_and_line_numbers(tmp_path: Path) -> None:
    data = 'id,Text,lang\r\na,"one\r\ntwo, ""quoted""\r\nthree",en\r\n\r\nb,  plain  ,fr\r\n'
    path = write(tmp_path / "c.csv", data)
    docs, problems = read(path)
    assert problems == []
    assert docs == [
        Document("a", 'one\r\ntwo, "quoted"\r\nthree', path, 2, {"lang": "en"}),
        Document("b", "plain", path, 6, {"lang": "fr"}),
    ]


def test_csv_detects_text_column_and_numbers_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "\ufefftitle,Article\nT1,body one\nT2,body two\n")
    docs, problems = read(path)
    assert problems == []
    assert [(d.id, d.text, d.line, d.meta) for d in docs] == [
        ("2", "body one", 2, {"title": "T1"}),
        ("3", "body two", 3, {"title": "T2"}),
    ]


def test_csv_explicit_text_field(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "text,summary\nlong,short\n")
    assert [d.text for d in read(path, text_field="summary")[0]] == ["short"]
    with pytest.raises(InputError, match='no column "abstract"') as e:
        read(path, text_field="abstract")
    assert "text, summary" in str(e.value)


def test_csv_no_text_column(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "id,title\n1,x\n")
    with pytest.raises(InputError, match="no text column") as e:
        read(path)
    assert path in str(e.value) and "id, title" in str(e.value) and "--text-field" in str(e.value)


def test_csv_header_only(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="only a header row"):
        read(write(tmp_path / "c.csv", "id,text\n"))
    with pytest.raises(InputError, match="the file is empty"):
        read(write(tmp_path / "d.csv", ""))


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "id,text\n1,a,extra\n2,b\n")
    docs, problems = read(path)
    assert [d.id for d in docs] == ["2"]
    only_problem(problems, path, 2, "expected 2 fields, got 3")


def test_csv_invalid_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", b'id,text\n1,"ok"\n2,"line one\nbad \xff here"\n3,fine\n')
    docs, problems = read(path)
    assert [(d.id, d.line) for d in docs] == [("1", 2), ("3", 5)]
    only_problem(problems, path, 3, 'not valid UTF-8 (byte 0xff in column "text")')


def test_csv_empty_text_duplicate_and_empty_id(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "id,text\na,x\nb,  \na,y\n,z\n")
    problems = read(path)[1]
    assert [(p.line, p.reason) for p in problems] == [
        (3, 'column "text" is empty'),
        (4, 'duplicate id "a" (first seen at line 2)'),
        (5, 'column "id" is empty'),
    ]


def test_csv_too_long(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "text\n" + "x" * 150 + "\n" + "y" * 100_000 + "\nok\n")
    docs, problems = read(path, max_chars=100)
    assert [(d.text, d.line) for d in docs] == [("ok", 4)]
    assert [(p.line, p.reason.split(";")[0]) for p in problems] == [
        (2, "document is 150 characters"),
        (3, "line is over 66,336 bytes"),
    ]


def test_csv_field_over_the_csv_limit(tmp_path: Path) -> None:
    saved = csv.field_size_limit(10)
    try:
        path = write(tmp_path / "c.csv", 'text\nok\n"' + ("y" * 99 + "\n") * 700 + '"\n')
        docs, problems = read(path, max_chars=100)
    finally:
        csv.field_size_limit(saved)
    assert docs[0] == Document("2", "ok", path, 2, {})
    assert (problems[0].line, problems[0].reason) == (
        3,
        "a field is over 65,736 characters; the limit is 100",
    )


def test_tsv(tmp_path: Path) -> None:
    path = write(tmp_path / "c.tsv", "id\ttext\tx\n1\thello, world\t2\n")
    assert read(path)[0] == [Document("1", "hello, world", path, 2, {"x": "2"})]
    assert read(path, fmt="csv")[0][0].text == "hello, world"


# --- stdin, gzip ---


def test_stdin_jsonl() -> None:
    problems: list[RowProblem] = []
    docs = list(read_documents("-", problems, stdin=io.BytesIO(b'{"text": "a"}\n[1]\n')))
    assert docs == [Document("1", "a", "<stdin>", 1, {})]
    only_problem(problems, "<stdin>", 2, "expected a JSON object, got a list")


def test_stdin_csv_and_empty() -> None:
    docs = list(read_documents("-", [], fmt="csv", stdin=io.BytesIO(b"text\nhi\n")))
    assert docs == [Document("2", "hi", "<stdin>", 2, {})]
    with pytest.raises(InputError, match="<stdin>: no documents"):
        list(read_documents("-", [], stdin=io.BytesIO(b"")))


def test_gzip(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl.gz", gzip.compress(jsonl({"text": "a"}).encode()))
    assert [d.text for d in read(path)[0]] == ["a"]
    path = write(tmp_path / "c.tsv.gz", gzip.compress(b"text\tid\nb\tq\n"))
    assert [(d.id, d.text) for d in read(path)[0]] == [("q", "b")]
    path = write(tmp_path / "bad.jsonl.gz", b"not gzip at all\n")
    with pytest.raises(InputError, match=r"bad\.jsonl\.gz: cannot read"):
        read(path)


# --- streaming ---


@pytest.mark.parametrize(
    "fmt, first, row, lines",
    [("jsonl", b"", b'{"text": "t"}\n', [1, 2]), ("csv", b"text\n", b'"a\nb"\n', [2, 4])],
)
def test_reading_streams(fmt: str, first: bytes, row: bytes, lines: list[int]) -> None:
    raw = Endless(first, row)  # never ends: a reader that read it all would hang
    docs = read_documents("-", [], fmt=fmt, stdin=io.BufferedReader(raw, 8192))  # type: ignore[type-var]
    assert [next(docs).line, next(docs).line] == lines
    assert raw.given <= 2 * 8192


def test_large_file_first_document_comes_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "big.jsonl", jsonl({"text": "x" * 50}) * 200_000)  # ~13 MB
    docs = read_documents(path, [])
    assert next(docs).line == 1
    stream = docs.gi_frame.f_locals["stream"]  # type: ignore[attr-defined]  # the open file
    assert 0 < stream.tell() <= 64 * 1024


# --- directories ---


def test_directory(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write(root / "b.txt", "  B text \n")
    write(root / "a" / "z.MD", "# Z")
    write(root / "a" / "deeper" / "y.txt", "Y")
    write(root / "a" / "image.png", b"\x89PNG\0")
    write(root / ".hidden" / "h.txt", "H")
    write(root / ".h.txt", "H")
    write(root / "bom.txt", b"\xef\xbb\xbfbom")
    docs, problems = read(str(root))
    assert problems == []
    assert [(d.id, d.text, d.source, d.line, d.meta) for d in docs] == [
        ("a/deeper/y.txt", "Y", "a/deeper/y.txt", None, {}),
        ("a/z.MD", "# Z", "a/z.MD", None, {}),
        ("b.txt", "B text", "b.txt", None, {}),
        ("bom.txt", "bom", "bom.txt", None, {}),
    ]


def test_directory_bad_files(tmp_path: Path) -> None:
    write(tmp_path / "bin.txt", b"caf\xe9")
    write(tmp_path / "nul.txt", b"a\0b")
    write(tmp_path / "empty.md", b"")
    write(tmp_path / "space.md", b" \n ")
    write(tmp_path / "huge.txt", "x" * 500)
    write(tmp_path / "long.txt", "\u00e9" * 60)  # 120 bytes on disk, 60 characters
    write(tmp_path / "ok.txt", "fine")
    docs, problems = read(str(tmp_path), max_chars=50)
    assert [d.id for d in docs] == ["ok.txt"]
    assert [(p.source, p.line, p.reason) for p in problems] == [
        ("bin.txt", None, "binary file (not UTF-8 text)"),
        ("empty.md", None, "file is empty"),
        ("huge.txt", None, "file is 500 bytes; the limit is 50 characters"),
        ("long.txt", None, "document is 60 characters; the limit is 50"),
        ("nul.txt", None, "binary file (not UTF-8 text)"),
        ("space.md", None, "file is empty"),
    ]


def test_directory_without_text_files(tmp_path: Path) -> None:
    write(tmp_path / "a.png", b"x")
    write(tmp_path / ".b.txt", "hidden")
    with pytest.raises(InputError, match=r"no \.txt or \.md files"):
        read(str(tmp_path))
