"""The `sumfleet` command line as a user runs it (subprocesses), with the fast lead engine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from models.db import head_revision
from models.settings import Settings
from producer.client import RESULT_FIELDS
from tests.conftest import SAMPLE, sumfleet


def _settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'cli.db'}", broker_url="redis://127.0.0.1:1/0")


def test_run_embedded_writes_jsonl_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = sumfleet("run", str(SAMPLE), "--model", "lead", "-o", str(out), settings=_settings(tmp_path))
    assert done.returncode == 0, done.stderr.decode()
    err = done.stderr.decode()
    assert "8/8" in err  # the progress bar reached the end
    assert "succeeded 8, failed 0, elapsed" in err and "docs/s" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows][:2] == ["harbour-ferry", "bakery-strike"]
    assert set(rows[0]) == {
        "id",
        "summary",
        "status",
        "error",
        "prompt_variant",
        "adapter",
        "prompt_tokens",
        "output_tokens",
        "generation_seconds",
        "pieces",
        "levels",
        "finish_reason",
        "warnings",
        "attempts",
        "worker",
        "queued_at",
        "started_at",
        "finished_at",
    }
    assert rows[0]["summary"].startswith("The city council voted on Tuesday")
    assert (rows[0]["pieces"], rows[0]["levels"]) == (1, 1)
    assert all(r["finish_reason"] == "stop" and r["warnings"] == [] for r in rows)  # lead: no limit, clean text
    assert (tmp_path / "cli.db").exists()  # the schema was created on a fresh SQLite file


def test_run_reads_stdin_csv_and_writes_csv(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    data = b'id,body\nx1,"First. Second. Third. Fourth."\nx2,"Only one."\n'
    done = sumfleet(
        "run",
        "-",
        "--format",
        "csv",
        "--model",
        "lead-1",
        "-o",
        str(out),
        "--no-progress",
        settings=_settings(tmp_path),
        input=data,
    )
    assert done.returncode == 0, done.stderr.decode()
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["id"], r["summary"]) for r in rows] == [("x1", "First."), ("x2", "Only one.")]


def test_results_as_parquet_with_typed_columns_in_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from producer import export

    settings = _settings(tmp_path)
    assert sumfleet("run", str(SAMPLE), "--model", "lead", "--no-progress", settings=settings).returncode == 0
    batch_id = json.loads(sumfleet("batches", "--json", settings=settings).stdout.decode().splitlines()[0])["id"]
    out = tmp_path / "out.parquet"
    done = sumfleet("results", batch_id, "-o", str(out), settings=settings)
    assert done.returncode == 0, done.stderr.decode()
    table = pq.read_table(out)
    assert table.num_rows == 8 and table.column_names == list(RESULT_FIELDS)
    assert str(table.schema.field("attempts").type) == "int64"
    assert str(table.schema.field("finished_at").type) == "timestamp[us, tz=UTC]"
    warnings_type = table.schema.field("warnings").type  # a list of strings
    assert pa.types.is_list(warnings_type) and pa.types.is_string(warnings_type.value_type)
    assert str(table.schema.field("finish_reason").type) == "string"
    assert table.column("warnings").to_pylist() == [[]] * 8
    assert set(table.column("finish_reason").to_pylist()) == {"stop"}
    assert table.column("summary")[0].as_py().startswith("The city council voted on Tuesday")
    monkeypatch.setattr(export, "PARQUET_ROWS", 3)  # row groups: the writer never holds more than 3 rows
    rows = [{name: None for name in RESULT_FIELDS} | {"id": str(i)} for i in range(7)]
    assert export.write_results(rows, str(tmp_path / "groups.parquet")) == 7
    assert pq.ParquetFile(tmp_path / "groups.parquet").metadata.num_row_groups == 3
    stdout = sumfleet("results", batch_id, "--format", "parquet", settings=settings)
    assert stdout.returncode == 1 and "Parquet cannot go to stdout" in stdout.stderr.decode()


def test_run_to_stdout_keeps_stdout_clean(tmp_path: Path) -> None:
    done = sumfleet("run", str(SAMPLE), "--model", "lead", "--no-progress", settings=_settings(tmp_path))
    assert done.returncode == 0
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["status"] == "succeeded" for line in lines)


def test_directory_input(tmp_path: Path) -> None:
    corpus = tmp_path / "docs"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("Alpha one. Alpha two.")
    (corpus / "sub" / "b.md").write_text("Beta one.")
    done = sumfleet("run", str(corpus), "--model", "lead", "--no-progress", settings=_settings(tmp_path))
    assert done.returncode == 0, done.stderr.decode()
    assert [json.loads(line)["id"] for line in done.stdout.decode().splitlines()] == ["a.txt", "sub/b.md"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "missing.jsonl", "--model", "lead"], "missing.jsonl: no such file or directory"),
        (["run", "{sample}", "--model", "gpt-17"], "unknown model 'gpt-17'"),
        (["run", "{sample}", "--model", "lead", "--prompt", "shorter"], "unknown prompt template 'shorter'"),
        (["run", "{sample}", "--model", "lead", "--prompt", "Summarize it."], "unknown prompt template"),
        (["run", "{sample}", "--model", "lead", "--prompt", "Sum {doc}"], "unknown placeholder {doc}"),
        (
            ["run", "{sample}", "--model", "lead", "--max-new-tokens", "-3"],
            "--max-new-tokens must be between 1 and 4096, got -3",
        ),
        (["run", "{sample}", "--model", "lead", "--max-new-tokens", "100000"], "got 100000"),
        (["status", "b0000"], "no batch 'b0000' in this database"),
        (["results", "b0000"], "no batch 'b0000'"),
        (["submit", "{sample}", "--model", "lead"], "cannot reach the broker at redis://127.0.0.1:1/0"),
        (["prompts", "show", "nope"], "unknown prompt template 'nope'"),
    ],
)
def test_errors_name_what_was_wrong(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("{sample}", str(SAMPLE)) for a in args]
    done = sumfleet(*args, settings=_settings(tmp_path))
    assert done.returncode == 1, done
    assert message in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


def test_bad_environment_is_named(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SUMFLEET_CHUNK_SIZE": "-1"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "batches"], env=env, capture_output=True, cwd=tmp_path)
    assert done.returncode == 1
    assert "SUMFLEET_CHUNK_SIZE: Input should be greater than or equal to 1" in done.stderr.decode()


def test_help_explains_commands_and_configuration() -> None:
    top = sumfleet("--help").stdout.decode()
    for word in (
        "run",
        "submit",
        "worker",
        "status",
        "batches",
        "results",
        "SUMFLEET_DATABASE_URL",
        "SUMFLEET_BROKER_URL",
        "SUMFLEET_MODEL",
        "SUMFLEET_CHUNK_SIZE",
        "SUMFLEET_MAX_NEW_TOKENS",
    ):
        assert word in top
    submit = sumfleet("submit", "--help").stdout.decode()
    for flag in ("--model", "--prompt", "--max-new-tokens", "--skip-bad-rows", "--text-field", "SUMFLEET_BROKER_URL"):
        assert flag in submit


def test_prompts_and_db_commands(tmp_path: Path) -> None:
    listed = sumfleet("prompts").stdout.decode()
    assert "one-sentence" in listed and "en/zh" in listed
    shown = sumfleet("prompts", "show", "one-sentence").stdout.decode()
    assert "[en]\nSummarize the following article in one sentence:" in shown
    assert "[zh]\n请将以下文章简化为一句话：" in shown
    settings = _settings(tmp_path)
    assert sumfleet("db", "revision", settings=settings).stdout.decode().strip() == "none"
    assert sumfleet("db", "upgrade", settings=settings).returncode == 0
    assert sumfleet("db", "revision", settings=settings).stdout.decode().strip() == head_revision()


def test_worker_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    done = sumfleet("worker", "--model", "lead", settings=_settings(tmp_path), timeout=60)
    assert done.returncode == 1
    assert "schema revision none (empty)" in done.stderr.decode() and "sumfleet db upgrade" in done.stderr.decode()


def test_eval_a_finished_batch_against_its_references(tmp_path: Path) -> None:
    corpus = tmp_path / "refs.jsonl"
    rows = [
        {
            "id": "a",
            "category": "river",
            "summary": "Volunteers cleaned the river.",
            "text": "Volunteers cleaned the river on Saturday. They found tyres. The city thanked them. More later.",
        },
        {
            "id": "b",
            "category": "chess",
            "summary": "A girl won the chess title.",
            "text": "A girl won the chess title. She is twelve. Her coach is proud. She travels next.",
        },
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = _settings(tmp_path)
    out = tmp_path / "out.jsonl"
    assert sumfleet("run", str(corpus), "--model", "lead-1", "-o", str(out), settings=settings).returncode == 0
    batch = json.loads(sumfleet("batches", "--json", settings=settings).stdout.decode().splitlines()[0])["id"]

    shown = sumfleet("eval", batch, "--group-field", "category", "--bootstrap", "100", settings=settings)
    assert shown.returncode == 0, shown.stderr.decode()
    table = shown.stdout.decode()
    assert "ROUGE-1" in table and "Lead-3" in table and "river" in table and "chess" in table
    report = json.loads(sumfleet("eval", batch, "--json", "--bootstrap", "100", settings=settings).stdout)
    assert report["n"] == 2
    assert report["system"]["rouge1"]["mid"] > report["lead3"]["rouge1"]["mid"]  # lead-1 is closer than Lead-3

    from_files = sumfleet("eval", "--results", str(out), "--references", str(corpus), "--json", "--bootstrap", "100")
    assert from_files.returncode == 0, from_files.stderr.decode()
    assert json.loads(from_files.stdout)["system"] == report["system"]
    missing = sumfleet("eval", "b-nope", settings=settings)
    assert missing.returncode == 1 and "no batch 'b-nope'" in missing.stderr.decode()
