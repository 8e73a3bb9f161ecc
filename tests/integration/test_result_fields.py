"""`finish_reason`, `warnings` and `--trim` end to end: `sumfleet submit`, a real `sumfleet worker`
process (the scripted plugin backend: each document says what the "model" answers), PostgreSQL
and Redis, then `sumfleet results` as JSONL, CSV and Parquet."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import pytest

from models.settings import Settings
from producer.client import BatchStatus, Client
from tests.conftest import sumfleet, wait_for
from tests.worker.test_result_quality import EXPECTED, LIMIT, SCRIPTED, documents

pytestmark = pytest.mark.services


def test_trim_finish_reason_and_warnings_through_a_worker(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in documents()))
    batches = {}
    for trim in ("sentence", "none"):
        args = ["submit", str(corpus), "--model", SCRIPTED, "--max-new-tokens", str(LIMIT)]
        submitted = sumfleet(*args, *(["--trim", trim] if trim == "none" else []), settings=fleet_settings)
        assert submitted.returncode == 0, submitted.stderr.decode()
        batches[trim] = submitted.stdout.decode().strip()
    refused = sumfleet("submit", str(corpus), "--trim", "words", settings=fleet_settings)
    assert refused.returncode == 2 and "invalid choice: 'words'" in refused.stderr.decode()

    worker = start_worker(fleet_settings, SCRIPTED)
    client = Client(fleet_settings, migrate=False)

    def ended(batch_id: str) -> BatchStatus | None:
        status = client.status(batch_id)
        return status if status.done else None

    for trim, batch_id in batches.items():
        status = wait_for(partial(ended, batch_id), 120, "the batch to finish")
        assert status.counts == {"succeeded": 6, "failed": 1}, worker.text()

        out = tmp_path / f"{trim}.jsonl"
        assert sumfleet("results", batch_id, "-o", str(out), settings=fleet_settings).returncode == 0
        rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert {name: (r["summary"], r["finish_reason"], r["warnings"]) for name, r in rows.items()} == EXPECTED[trim]

        csv_out = tmp_path / f"{trim}.csv"
        assert sumfleet("results", batch_id, "-o", str(csv_out), settings=fleet_settings).returncode == 0
        with csv_out.open(newline="") as handle:
            cells = {r["id"]: (r["finish_reason"], r["warnings"]) for r in csv.DictReader(handle)}
        assert cells == {name: (reason, ";".join(found)) for name, (_, reason, found) in EXPECTED[trim].items()}

        parquet_out = tmp_path / f"{trim}.parquet"
        assert sumfleet("results", batch_id, "-o", str(parquet_out), settings=fleet_settings).returncode == 0
        table = pq.read_table(parquet_out)
        warnings_type = table.schema.field("warnings").type
        assert pa.types.is_list(warnings_type) and pa.types.is_string(warnings_type.value_type)
        assert dict(zip(table.column("id").to_pylist(), table.column("warnings").to_pylist(), strict=True)) == {
            name: found for name, (_, _, found) in EXPECTED[trim].items()
        }
    cut = {trim: client.results(batch_id) for trim, batch_id in batches.items()}
    trimmed, kept = (next(r for r in cut[t] if r["id"] == "cut") for t in ("sentence", "none"))
    assert kept["summary"].startswith(trimmed["summary"]) and trimmed["output_tokens"] == kept["output_tokens"]
