"""Parquet files and Hugging Face datasets saved with `save_to_disk` as inputs (`producer.inputs`).

Parquet files are written here with pyarrow; datasets with the `datasets` package (the folders it
writes are read back by sumfleet with pyarrow alone, and compared with what `datasets` reads).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from models.errors import InputError, RowProblem
from models.settings import Settings
from producer.inputs import BATCH_ROWS, Document, read_documents
from tests.conftest import ROOT, sumfleet

pa = pytest.importorskip("pyarrow", reason="Parquet and datasets input need pyarrow (the parquet/test extras)")
pq = pytest.importorskip("pyarrow.parquet")


def read(path: Path | str, **kw: Any) -> tuple[list[Document], list[RowProblem]]:
    problems: list[RowProblem] = []
    return list(read_documents(str(path), problems, **kw)), problems


def write_parquet(path: Path, columns: dict[str, Any], **kw: Any) -> Path:
    """A Parquet file of `columns` (name -> values, or name -> pyarrow array for a given type)."""
    pq.write_table(pa.table(columns), path, **kw)
    return path


def datasets_module() -> Any:
    return pytest.importorskip(
        "datasets", reason="`datasets` is not installed (pip install datasets): it writes the saved-dataset fixtures"
    )


# -- Parquet ---------------------------------------------------------------------------------------


def test_parquet_rows_become_documents_with_json_meta(tmp_path: Path) -> None:
    moment = datetime(2024, 5, 17, 9, 30, 15, 250000, tzinfo=UTC)
    path = write_parquet(
        tmp_path / "news.parquet",
        {
            "id": [7, 8],
            # matched case-insensitively; dictionary-encoded, as pandas writes a categorical column
            "Article": pa.array(["  The ferry runs again.  ", "The bakery is closed."]).dictionary_encode(),
            "published": pa.array([moment, None], pa.timestamp("us", tz="UTC")),
            "logged": pa.array([1715938215123456789, 0], pa.timestamp("ns")),  # nanoseconds: cut to microseconds
            "day": pa.array([date(2024, 5, 17), date(2024, 5, 18)]),
            "price": pa.array([Decimal("12.50"), Decimal("0.10")], pa.decimal128(6, 2)),
            "raw": pa.array([b"caf\xc3\xa9", b"plain"], pa.binary()),
            "score": [float("nan"), 0.5],
            "author": pa.array(
                [{"name": "Ana", "tags": ["a", "b"]}, {"name": "Bo", "tags": []}],
                pa.struct([("name", pa.string()), ("tags", pa.list_(pa.string()))]),
            ),
            "extra": pa.array([[("k", 1)], []], pa.map_(pa.string(), pa.int64())),
        },
    )
    docs, problems = read(path)
    assert problems == []
    assert [(d.id, d.text, d.source, d.line) for d in docs] == [
        ("7", "The ferry runs again.", str(path), 1),
        ("8", "The bakery is closed.", str(path), 2),
    ]
    assert docs[0].meta == {
        "published": "2024-05-17T09:30:15.250000+00:00",
        "logged": "2024-05-17T09:30:15.123456",
        "day": "2024-05-17",
        "price": "12.50",  # exact, as a string
        "raw": "café",  # UTF-8 bytes become text
        "score": None,  # NaN: a missing value
        "author": {"name": "Ana", "tags": ["a", "b"]},
        "extra": {"k": 1},
    }
    assert docs[1].meta["published"] is None and docs[1].meta["extra"] == []
    json.dumps([d.meta for d in docs], allow_nan=False)  # all of it is plain JSON


def test_parquet_bad_rows_are_reported_with_row_and_column(tmp_path: Path) -> None:
    long_id = "x" * 513
    path = write_parquet(
        tmp_path / "bad.parquet",
        {
            "doc_id": ["a", "b", "c", long_id, None, "f", "g", "a", "i"],
            "text": ["Fine.", None, "Has a \x00 NUL.", "Long id.", "No id.", "Binary meta.", "Inf.", "Again.", "Ok."],
            "blob": pa.array([None, None, None, None, None, b"\xff\xfe", None, None, None], pa.binary()),
            "weight": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, float("inf"), 1.0, 1.0],
            "info": pa.array([{"note": "ok"}] * 8 + [{"note": "nul \x00 inside"}], pa.struct([("note", pa.string())])),
        },
    )
    docs, problems = read(path, id_field="doc_id")
    assert [(d.id, d.line) for d in docs] == [("a", 1)]
    got = [(p.source, p.line, p.reason) for p in problems]
    where = str(path)
    assert got == [
        (where, 2, 'column "text" is null'),
        (where, 3, 'column "text" holds a NUL character (\\u0000) at position 6'),
        (where, 4, 'column "doc_id" is 513 characters; the limit is 512'),
        (where, 5, 'column "doc_id" is null'),
        (where, 6, 'column "blob" holds binary data that is not UTF-8 text'),
        (where, 7, 'column "weight" is inf (JSON has no infinity)'),
        (where, 8, 'duplicate id "a" (first seen at line 1)'),
        (where, 9, 'field "info.note" holds a NUL character (\\u0000) at position 4'),
    ]
    assert str(problems[0]) == f'{where}:2: column "text" is null'


def test_parquet_rows_are_numbered_across_batches_and_row_groups(tmp_path: Path) -> None:
    total = 3 * BATCH_ROWS + 17
    texts: list[str | None] = [f"Document number {i}." for i in range(1, total + 1)]
    texts[BATCH_ROWS + 4] = None  # row BATCH_ROWS + 5, in the second batch
    path = write_parquet(tmp_path / "many.parquet", {"text": texts}, row_group_size=100)
    assert pq.ParquetFile(path).num_row_groups > 1
    docs, problems = read(path)
    assert len(docs) == total - 1
    assert problems == [RowProblem(str(path), BATCH_ROWS + 5, 'column "text" is null')]
    assert all(d.id == str(d.line) and d.text == f"Document number {d.line}." for d in docs)  # no id column
    assert docs[-1].line == total


def test_parquet_text_and_id_fields_are_chosen_like_csv_columns(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "cols.parquet", {"key": ["k1", "k2"], "body": ["Body one.", "Body two."], "summary": ["s", "t"]}
    )
    docs, _ = read(path, text_field="Summary", id_field="KEY")
    assert [(d.id, d.text, d.meta) for d in docs] == [
        ("k1", "s", {"body": "Body one."}),
        ("k2", "t", {"body": "Body two."}),
    ]
    with pytest.raises(InputError, match=r'no column "headline" \(the columns are: key, body, summary\)'):
        read(path, text_field="headline")
    with pytest.raises(InputError, match=r'no id column "uid" \(the columns are: key, body, summary\)'):
        read(path, id_field="uid")
    numbers = write_parquet(tmp_path / "numbers.parquet", {"n": [1, 2], "score": [0.1, 0.2]})
    with pytest.raises(InputError, match=r"no text column \(looked for text, document, article, content, body\)"):
        read(numbers)
    with pytest.raises(InputError, match=r'column "n" holds int64 values, not text'):
        read(numbers, text_field="n")


def test_parquet_id_of_another_type_is_a_bad_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "ids.parquet", {"id": [1.5, 2.5], "text": ["One.", "Two."]})
    docs, problems = read(path)
    assert docs == []
    assert problems[0] == RowProblem(str(path), 1, 'column "id" must be a string or integer, got float')


def test_parquet_whole_file_failures(tmp_path: Path) -> None:
    empty = write_parquet(tmp_path / "empty.parquet", {"text": pa.array([], pa.string())})
    with pytest.raises(InputError, match=r"empty\.parquet: no documents \(the file has no rows\)"):
        read(empty)
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"text": "not parquet"}\n')
    with pytest.raises(InputError, match=r"fake\.parquet: not a readable Parquet file"):
        read(fake)
    zipped = tmp_path / "x.parquet.gz"
    zipped.write_bytes(b"\x1f\x8b")
    with pytest.raises(InputError, match="gzip-compressed Parquet file"):
        read(zipped)
    with pytest.raises(InputError, match="<stdin>: Parquet cannot be read from stdin"):
        read("-", fmt="parquet")


def test_format_parquet_reads_a_file_of_any_name(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "corpus.pq", {"text": ["Named by --format."]})
    docs, _ = read(path, fmt="parquet")
    assert [d.text for d in docs] == ["Named by --format."]


def test_missing_pyarrow_says_how_to_install_it(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"text": ["x"]})
    script = (
        "import sys; sys.modules['pyarrow'] = None\n"  # as if pyarrow were not installed
        "from models.errors import InputError\n"
        "from producer.inputs import read_documents\n"
        "try:\n"
        f"    read_documents({str(path)!r}, [])\n"
        "except InputError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "Parquet input needs pyarrow: pip install 'sumfleet[parquet]'"


def test_parquet_meta_is_stored_by_postgresql(tmp_path: Path, own_database: str) -> None:
    from sqlalchemy import select

    from models.tables import Job
    from producer.client import Client

    path = write_parquet(
        tmp_path / "typed.parquet",
        {
            "id": ["t1", "t2"],
            "text": ["First document.", "Second document."],
            "at": pa.array([datetime(2024, 3, 1, 12, tzinfo=UTC), None], pa.timestamp("ns", tz="UTC")),
            "amount": pa.array([Decimal("3.14"), Decimal("-1.00")], pa.decimal128(5, 2)),
            "ratio": [float("nan"), 2.5],
            "tags": [["x"], []],
        },
    )
    client = Client(Settings(database_url=own_database, broker_url="redis://127.0.0.1:1/0"))
    try:
        submission = client.submit_file(str(path), model="lead", publish=False)  # PostgreSQL COPY of the rows
        assert submission.accepted == 2
        with client.sessions() as session:
            stored = session.execute(select(Job.doc_id, Job.line, Job.meta).order_by(Job.id)).all()
    finally:
        client.close()
    assert [tuple(row) for row in stored] == [
        ("t1", 1, {"at": "2024-03-01T12:00:00+00:00", "amount": "3.14", "ratio": None, "tags": ["x"]}),
        ("t2", 2, {"at": None, "amount": "-1.00", "ratio": 2.5, "tags": []}),
    ]


# -- Hugging Face datasets saved to disk ---------------------------------------------------------


def test_saved_dataset_is_read_without_datasets_as_datasets_reads_it(tmp_path: Path) -> None:
    datasets = datasets_module()
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "document": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["sports", "politics"]),
            "year": datasets.Value("int32"),
        }
    )
    rows = {
        "id": [f"d{i}" for i in range(10)],
        "document": [f"Story {i} happened." for i in range(10)],
        "label": [i % 2 for i in range(10)],
        "year": [2000 + i for i in range(10)],
    }
    folder = tmp_path / "news"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder), num_shards=3)
    assert len(list(folder.glob("data-*.arrow"))) == 3  # the rows are numbered across the shards
    docs, problems = read(folder)  # detected: a folder with state.json
    assert problems == []
    loaded = datasets.load_from_disk(str(folder))
    label = loaded.features["label"]
    assert [(d.id, d.text, d.line, d.source, d.meta) for d in docs] == [
        (r["id"], r["document"], i, str(folder), {"label": label.int2str(r["label"]), "year": r["year"]})
        for i, r in enumerate(loaded, start=1)
    ]
    assert docs[1].meta == {"label": "politics", "year": 2001}
    assert read(folder, fmt="hf")[0] == docs


def test_saved_dataset_bad_rows_name_row_and_column(tmp_path: Path) -> None:
    datasets = datasets_module()
    folder = tmp_path / "ds"
    texts = ["Good one.", None, "  ", "Also good."]
    datasets.Dataset.from_dict({"text": texts, "n": [1, 2, 3, 4]}).save_to_disk(str(folder), num_shards=2)
    docs, problems = read(folder)
    assert [(d.id, d.line, d.meta) for d in docs] == [("1", 1, {"n": 1}), ("4", 4, {"n": 4})]
    assert problems == [
        RowProblem(str(folder), 2, 'column "text" is null'),
        RowProblem(str(folder), 3, 'column "text" is empty'),
    ]


def test_dataset_dict_needs_a_split_folder(tmp_path: Path) -> None:
    datasets = datasets_module()
    folder = tmp_path / "corpus"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["Train one.", "Train two."]}),
            "test": datasets.Dataset.from_dict({"text": ["Test one."]}),
        }
    ).save_to_disk(str(folder))
    with pytest.raises(InputError, match=r"a DatasetDict with splits train, test; give the folder of one split"):
        read(folder)
    with pytest.raises(InputError, match=r"e\.g\. .*corpus/train"):
        read(folder, fmt="hf")
    docs, _ = read(folder / "test")
    assert [(d.text, d.source) for d in docs] == [("Test one.", str(folder / "test"))]


def test_directory_kinds_and_hf_format_errors(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("A plain text file.")
    docs, _ = read(notes)  # no state.json: still the text-files reader
    assert [(d.id, d.text) for d in docs] == [("a.txt", "A plain text file.")]
    with pytest.raises(InputError, match=r"no state\.json, so not a folder written by `Dataset\.save_to_disk`"):
        read(notes, fmt="hf")
    with pytest.raises(InputError, match=r"not a directory \(format hf reads the folder"):
        read(notes / "a.txt", fmt="hf")
    with pytest.raises(InputError, match=r"<stdin>: a directory cannot be read from stdin"):
        read("-", fmt="hf")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    with pytest.raises(InputError, match=r"data-00000-of-00001\.arrow: no such file \(listed in"):
        read(broken)
    (broken / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../elsewhere.arrow"}]}))
    with pytest.raises(InputError, match='no list of data files \\("_data_files"'):
        read(broken)
    (broken / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    (broken / "data.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match=r"data\.arrow: not an Arrow file"):
        read(broken)


# -- the command line --------------------------------------------------------------------------


def _settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'cli.db'}", broker_url="redis://127.0.0.1:1/0")


def test_sumfleet_run_summarizes_a_parquet_file(tmp_path: Path) -> None:
    corpus = write_parquet(
        tmp_path / "corpus.parquet",
        {
            "id": ["p1", "p2"],
            "text": [
                "The harbour ferry resumed service on Monday. Repairs took three weeks. Riders cheered.",
                "The bakery on Main Street closed early. Its ovens failed. It reopens Friday.",
            ],
            "when": pa.array([datetime(2024, 1, 2, tzinfo=UTC)] * 2, pa.timestamp("ms", tz="UTC")),
        },
    )
    out = tmp_path / "out.jsonl"
    done = sumfleet(
        "run", str(corpus), "--model", "lead", "--no-progress", "-o", str(out), settings=_settings(tmp_path)
    )
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in rows] == [("p1", "succeeded"), ("p2", "succeeded")]
    assert rows[0]["summary"].startswith("The harbour ferry resumed service on Monday.")
    bad = write_parquet(tmp_path / "bad.pq", {"text": ["Fine text here.", None]})
    done = sumfleet("run", str(bad), "--format", "parquet", "--model", "lead", settings=_settings(tmp_path))
    assert done.returncode != 0
    assert f'{bad}:2: column "text" is null' in done.stderr.decode()


def test_sumfleet_run_summarizes_a_saved_dataset_split(tmp_path: Path) -> None:
    datasets = datasets_module()
    folder = tmp_path / "corpus"
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"article": ["Rain fell all day. Streets flooded."]})}
    ).save_to_disk(str(folder))
    out = tmp_path / "out.jsonl"
    done = sumfleet("run", str(folder), "--model", "lead", "-o", str(out), settings=_settings(tmp_path))
    assert done.returncode != 0 and "a DatasetDict with splits validation" in done.stderr.decode()
    done = sumfleet(
        "run",
        str(folder / "validation"),
        "--format",
        "hf",
        "--model",
        "lead",
        "--no-progress",
        "-o",
        str(out),
        settings=_settings(tmp_path),
    )
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["status"], r["summary"][:15]) for r in rows] == [("1", "succeeded", "Rain fell all d")]
