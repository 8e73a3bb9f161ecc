"""Bad input, as a user meets it: each case runs the real CLI and checks the exact error line.

Every case runs against a database that already holds an accepted batch; at the end that
batch is intact and no other batch or message appeared: nothing accepted is lost, nothing
half-submitted is left behind.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from models.settings import Settings
from producer.client import Client
from tests.conftest import SAMPLE, sumfleet

pytestmark = pytest.mark.services


def _files(root: Path) -> dict[str, Path]:
    """Write every bad input once; returns name -> path."""
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        path = root / name
        path.write_bytes(data)
        files[name] = path

    put("empty.jsonl", b"")
    put("blank.jsonl", b"\n  \n\t\n")
    put("whitespace-doc.jsonl", b'{"id": "a", "text": "Fine."}\n{"id": "b", "text": "   \\n  "}\n')
    put("malformed.jsonl", b'{"id": "a", "text": "Fine."}\n{"id": "b" "text": "x"}\n')
    put("array.json", json.dumps([{"text": "a"}, {"text": "b"}]).encode())
    put("no-text.jsonl", b'{"id": "a", "body": "The text is under another name."}\n')
    put("number-text.jsonl", b'{"id": "a", "text": 42}\n')
    put("latin1.jsonl", '{"id": "a", "text": "caf\u00e9"}\n'.encode("latin-1"))
    put("utf16.jsonl", '{"id": "a", "text": "hello"}\n'.encode("utf-16"))
    put("dup-ids.jsonl", b'{"id": "a", "text": "One."}\n{"id": "b", "text": "Two."}\n{"id": "a", "text": "Three."}\n')
    put("list-id.jsonl", b'{"id": ["a"], "text": "One."}\n')
    put("no-text-column.csv", b"id,title\n1,Hello\n")
    put("huge.jsonl", b'{"id": "big", "text": "' + b"word " * (10 * 1024 * 1024) + b'"}\n')  # 50 MB
    put("prompt.txt", b"Summarize for a child: {document}")
    put("latin1-prompt.txt", "R\u00e9sume: {document}".encode("latin-1"))
    put("empty-prompt.txt", b"  \n")
    put("nul-text.jsonl", b'{"id": "a", "text": "Fine."}\n{"id": "b", "text": "bad \\u0000 byte"}\n')
    put("nan-meta.jsonl", b'{"id": "a", "text": "Fine.", "score": NaN}\n{"id": "b", "text": "Fine.", "w": -Infinity}\n')
    put("nul-id.jsonl", b'{"id": "a\\u0000", "text": "Fine."}\n')
    put("nul-field.csv", b'id,text,note\n1,Fine.,"a\x00b"\n')
    put("surrogate-id.jsonl", b'{"id": "\\ud800", "text": "Fine."}\n')
    put("huge-int-id.jsonl", b'{"id": ' + b"9" * 5000 + b', "text": "Fine."}\n')
    put("long-id.jsonl", b'{"id": "' + b"x" * 600 + b'", "text": "Fine."}\n')
    put("unclosed-quote.csv", b'id,text\n1,"Never closed\n2,second\n3,third\n4,fourth\n')
    binary_dir = root / "with-binary"
    binary_dir.mkdir()
    (binary_dir / "good.txt").write_text("A fine document.")
    (binary_dir / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    files["with-binary"] = binary_dir
    empty_dir = root / "empty-dir"
    empty_dir.mkdir()
    (empty_dir / "notes.pdf").write_bytes(b"%PDF-1.4")
    files["empty-dir"] = empty_dir
    return files


# (case, arguments, line the user sees on stderr); {name} is a file above, {sample} the sample corpus
CASES = [
    ("empty file", ["submit", "{empty.jsonl}"], "{empty.jsonl}: no documents (the file is empty)"),
    ("only blank lines", ["submit", "{blank.jsonl}"], "{blank.jsonl}: no documents (the file is empty)"),
    ("whitespace document", ["submit", "{whitespace-doc.jsonl}"], '{whitespace-doc.jsonl}:2: field "text" is empty'),
    (
        "malformed JSON line",
        ["submit", "{malformed.jsonl}"],
        "{malformed.jsonl}:2: malformed JSON (Expecting ',' delimiter at column 12)",
    ),
    (
        "JSON array, not lines",
        ["submit", "{array.json}"],
        "{array.json}: a JSON array, not JSON Lines (one object per line)",
    ),
    (
        "missing text field",
        ["submit", "{no-text.jsonl}"],
        '{no-text.jsonl}:1: missing text: no "text" or "document" field',
    ),
    (
        "non-string text",
        ["submit", "{number-text.jsonl}"],
        '{number-text.jsonl}:1: field "text" must be a string, got number',
    ),
    ("undecodable bytes", ["submit", "{latin1.jsonl}"], "{latin1.jsonl}:1: not valid UTF-8 (byte 0xe9 at column 25)"),
    ("UTF-16 file", ["submit", "{utf16.jsonl}"], "{utf16.jsonl}: UTF-16 text; save it as UTF-8"),
    (
        "50 MB document",
        ["submit", "{huge.jsonl}"],
        "{huge.jsonl}:1: line is over 8,065,536 bytes; the limit is 1,000,000 characters",
    ),
    ("binary file in a directory", ["submit", "{with-binary}"], "photo.txt: binary file (not UTF-8 text)"),
    ("directory without text files", ["submit", "{empty-dir}"], "{empty-dir}: no .txt or .md files in the directory"),
    ("duplicate ids", ["submit", "{dup-ids.jsonl}"], '{dup-ids.jsonl}:3: duplicate id "a" (first seen at line 1)'),
    (
        "id of the wrong type",
        ["submit", "{list-id.jsonl}"],
        '{list-id.jsonl}:1: field "id" must be a string or integer, got list',
    ),
    (
        "CSV without a text column",
        ["submit", "{no-text-column.csv}"],
        "{no-text-column.csv}: no text column (looked for text, document, article, content, body); "
        "the columns are: id, title",
    ),
    ("input that does not exist", ["submit", "missing.jsonl"], "missing.jsonl: no such file or directory"),
    ("unknown model", ["submit", "{sample}", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    (
        "model not available offline",
        ["submit", "{sample}", "--model", "someone/some-model"],
        "model 'someone/some-model' is not in the local Hugging Face cache and downloads are off",
    ),
    (
        "unknown prompt template",
        ["submit", "{sample}", "--prompt", "one-sentense"],
        "unknown prompt template 'one-sentense'; known templates:",
    ),
    (
        "template without {document}",
        ["submit", "{sample}", "--prompt", "Summarize {{this}}"],
        "prompt template has no {document} placeholder",
    ),
    (
        "template with an unknown placeholder",
        ["submit", "{sample}", "--prompt", "For {audience}: {document}"],
        "prompt template uses unknown placeholder {audience}",
    ),
    (
        "template with a huge width",
        ["submit", "{sample}", "--prompt", "{document:>1000000000}"],
        "prompt template placeholder {document:>1000000000} has a format spec (:>1000000000): write {document}",
    ),
    (
        "huge width on another placeholder",
        ["submit", "{sample}", "--prompt", "{max_words:>2000000000}{document}"],
        "placeholder {max_words:>2000000000} has a format spec",
    ),
    ("template with a percent spec", ["submit", "{sample}", "--prompt", "{document:%}"], "has a format spec (:%)"),
    (
        "template with a conversion",
        ["submit", "{sample}", "--prompt", "{document!r}"],
        "placeholder {document!r} has a conversion (!r): write {document}",
    ),
    ("empty prompt", ["submit", "{sample}", "--prompt", ""], "prompt is empty"),
    ("empty prompt file", ["submit", "{sample}", "--prompt-file", "{empty-prompt.txt}"], "is empty"),
    (
        "Latin-1 prompt file",
        ["submit", "{sample}", "--prompt-file", "{latin1-prompt.txt}"],
        "--prompt-file {latin1-prompt.txt} is not UTF-8 (byte 0xe9 at offset 1); save it as UTF-8",
    ),
    (
        "NUL in the text",
        ["submit", "{nul-text.jsonl}"],
        '{nul-text.jsonl}:2: field "text" holds a NUL character (\\u0000) at position 4',
    ),
    (
        "NUL in the text, even with --skip-bad-rows",
        ["submit", "{nul-id.jsonl}", "--skip-bad-rows"],
        "{nul-id.jsonl}: no usable documents (1 bad rows)",
    ),
    ("NUL in a CSV field", ["submit", "{nul-field.csv}"], '{nul-field.csv}:2: field "note" holds a NUL character'),
    (
        "lone surrogate id",
        ["submit", "{surrogate-id.jsonl}"],
        '{surrogate-id.jsonl}:1: field "id" holds an unpaired surrogate (\\ud800)',
    ),
    (
        "5,000-digit integer id",
        ["submit", "{huge-int-id.jsonl}"],
        "{huge-int-id.jsonl}:1: malformed JSON (a number of over 4,300 digits)",
    ),
    (
        "600-character id",
        ["submit", "{long-id.jsonl}"],
        '{long-id.jsonl}:1: field "id" is 600 characters; the limit is 512',
    ),
    (
        "CSV quote never closed",
        ["submit", "{unclosed-quote.csv}"],
        "{unclosed-quote.csv}:2: a quoted field is never closed (lines 2-5, the end of the file, would be one field)",
    ),
    (
        "id field that rows lack",
        ["submit", "{sample}", "--id-field", "nope"],
        '{sample}:1: no "nope" field (the id field given)',
    ),
    (
        "id column that is not there",
        ["submit", "{nul-field.csv}", "--id-field", "nope"],
        '{nul-field.csv}: no id column "nope" (the columns are: id, text, note)',
    ),
    ("results into a directory", ["results", "b-nope", "-o", "{empty-dir}"], "it is a directory; give a file name"),
    ("results into /proc", ["results", "b-nope", "-o", "/proc/x.jsonl"], "cannot write /proc/x.jsonl:"),
    (
        "results of an unknown format",
        ["results", "b-nope", "-o", "out.xlsx"],
        "cannot tell the output format of out.xlsx",
    ),
    ("run into /proc", ["run", "{sample}", "-o", "/proc/x.csv"], "cannot write /proc/x.csv:"),
    (
        "run into a missing folder",
        ["run", "{sample}", "-o", "missing/dir/x.jsonl"],
        "directory missing/dir does not exist",
    ),
    (
        "NaN and Infinity in a JSON Lines row (not JSON; PostgreSQL refuses them)",
        ["submit", "{nan-meta.jsonl}"],
        '{nan-meta.jsonl}:1: field "score" is nan, which JSON cannot store (use null or a number)',
    ),
    (
        "a standard-library function as a plugin model",
        ["submit", "{sample}", "--model", "python:os:system"],
        "model 'python:os:system': 'os' is Python's standard library, not a plugin engine",
    ),
    (
        "both prompt flags",
        ["submit", "{sample}", "--prompt", "headline", "--prompt-file", "{prompt.txt}"],
        "give --prompt or --prompt-file, not both",
    ),
    (
        "missing prompt file",
        ["submit", "{sample}", "--prompt-file", "nope.txt"],
        "cannot read --prompt-file nope.txt: No such file or directory",
    ),
    (
        "negative generation limit",
        ["submit", "{sample}", "--max-new-tokens", "-5"],
        "--max-new-tokens must be between 1 and 4096, got -5",
    ),
    (
        "absurd generation limit",
        ["submit", "{sample}", "--max-new-tokens", "1000000"],
        "--max-new-tokens must be between 1 and 4096, got 1000000",
    ),
    ("unknown batch id", ["status", "b-nope"], "no batch 'b-nope' in this database (see `sumfleet batches`)"),
    ("unknown batch id to cancel", ["cancel", "b-nope"], "no batch 'b-nope' in this database"),
    (
        "unreachable database",
        ["submit", "{sample}", "--database-url", "postgresql+psycopg://postgres@127.0.0.1:9/test"],
        "cannot reach database postgresql+psycopg://postgres@127.0.0.1:9/test:",
    ),
    (
        "wrong database credentials",
        ["submit", "{sample}", "--database-url", "postgresql+psycopg://nobody:secret@127.0.0.1:5432/test"],
        'password authentication failed for user "nobody"|role "nobody" does not exist',
    ),
    (
        "database URL of an unknown kind",
        ["submit", "{sample}", "--database-url", "oracle+nothing://x/y"],
        "database URL 'oracle+nothing://x/y' is not usable",
    ),
    (
        "unreachable broker",
        ["submit", "{sample}", "--broker-url", "redis://127.0.0.1:9/0"],
        "cannot reach the broker at redis://127.0.0.1:9/0",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _files(tmp_path_factory.mktemp("bad"))


def test_there_are_at_least_25_cases() -> None:
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 25


def test_bad_inputs_get_exact_errors_and_nothing_accepted_is_lost(
    fleet_settings: Settings, files: dict[str, Path]
) -> None:
    settings = fleet_settings.model_copy(update={"model": "lead"})
    good = sumfleet("submit", str(SAMPLE), settings=settings)
    assert good.returncode == 0, good.stderr.decode()
    accepted = good.stdout.decode().strip()
    client = Client(settings)
    before = [(b.id, b.total, b.counts) for b in client.batches(10_000)]
    broker = redis.Redis.from_url(settings.broker_url)
    messages = broker.llen(str(settings.queue))

    def fill(text: str) -> str:
        text = text.replace("{sample}", str(SAMPLE))
        for name, path in files.items():
            text = text.replace("{" + name + "}", str(path))
        return text

    def check(case: tuple[str, list[str], str]) -> str | None:
        name, args, expected = case
        done = sumfleet(*[fill(a) for a in args], settings=settings, timeout=120)
        stderr = done.stderr.decode()
        wanted = [fill(e) for e in expected.split("|")]
        if done.returncode != 1 or not any(w in stderr for w in wanted) or "Traceback" in stderr or done.stdout:
            return f"{name}: exit {done.returncode}, stderr {stderr!r}, expected {wanted}"
        return None

    # two CLI processes at a time (each case is independent: nothing may be accepted), CI's two cores
    with ThreadPoolExecutor(2) as pool:
        failures = [failure for failure in pool.map(check, CASES) if failure]
    assert not failures, "\n".join(failures)

    assert [(b.id, b.total, b.counts) for b in client.batches(10_000)] == before
    assert broker.llen(str(settings.queue)) == messages
    assert client.status(accepted).counts == {"queued": 8}
    broker.close()


def test_bad_settings_are_refused_before_anything_runs(fleet_settings: Settings) -> None:
    risky = fleet_settings.model_copy()
    env_overrides = {"task_time_limit": 3600, "visibility_timeout": 600}
    import subprocess
    import sys

    from tests.conftest import settings_env

    env = settings_env(risky)
    env.update({f"SUMFLEET_{k.upper()}": str(v) for k, v in env_overrides.items()})
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker", "--model", "lead"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 1
    assert (
        "visibility_timeout (600s) must exceed task_time_limit (3600s), or Redis redelivers a chunk "
        "that is still running"
    ) in done.stderr.decode()
