"""The real default model (bundled SmolLM2-135M-Instruct) end to end: embedded and through a worker."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from models.settings import Settings
from producer.client import Client
from tests.conftest import SAMPLE, sumfleet, wait_for

pytestmark = pytest.mark.model

# Each sample document's summary should name its topic; these words are the documents' own.
TOPICS = {"harbour-ferry": "ferry", "comet-sighting": "comet", "chess-prodigy": "chess"}


def _sample(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    picked = tmp_path / "three.jsonl"
    picked.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in TOPICS))
    return picked


def _check_summaries(rows: list[dict]) -> None:
    assert sorted(r["id"] for r in rows) == sorted(TOPICS)
    for row in rows:
        assert row["status"] == "succeeded", row
        summary = row["summary"]
        assert len(summary.split()) >= 5, row
        assert TOPICS[row["id"]] in summary.lower(), f"summary of {row['id']} is off topic: {summary!r}"
        assert 0 < row["output_tokens"] <= 40 and row["prompt_tokens"] > 50
        assert row["prompt_variant"] == "en"  # detected per document: these are English
    assert len({r["summary"] for r in rows}) == len(rows)


@pytest.mark.services
def test_default_model_through_a_worker_process(fleet_settings: Settings, start_worker, tmp_path: Path) -> None:
    submitted = sumfleet("submit", str(_sample(tmp_path)), "--max-new-tokens", "40", settings=fleet_settings)
    assert submitted.returncode == 0, submitted.stderr.decode()
    batch_id = submitted.stdout.decode().strip()
    worker = start_worker(fleet_settings, "smollm2")
    client = Client(fleet_settings, migrate=False)
    status = wait_for(lambda: (s := client.status(batch_id)).done and s, 600, "the batch to finish", poll=1)
    assert status.counts == {"succeeded": 3}, worker.text()
    assert status.model == "smollm2"
    _check_summaries(list(client.results(batch_id)))


def _done(client: Client, batch_id: str) -> bool:
    return client.status(batch_id).done


def test_embedded_run_with_the_default_model(tmp_path: Path) -> None:
    out = tmp_path / "summaries.jsonl"
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'run.db'}")
    done = sumfleet("run", str(_sample(tmp_path)), "-o", str(out), "--max-new-tokens", "40", settings=settings)
    assert done.returncode == 0, done.stderr.decode()
    assert "succeeded 3, failed 0" in done.stderr.decode()
    _check_summaries([json.loads(line) for line in out.read_text().splitlines()])


@pytest.mark.services
def test_a_long_document_through_a_worker_is_map_reduced(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    from tests.worker.longdoc import long_document

    settings = fleet_settings.model_copy(update={"max_input_tokens": 512})
    corpus = tmp_path / "long.jsonl"
    short = json.loads(SAMPLE.read_text().splitlines()[0])
    corpus.write_text(json.dumps({"id": "report", "text": long_document(2600)}) + "\n" + json.dumps(short) + "\n")
    batch_ids = {}
    for strategy in ("map-reduce", "truncate"):
        submitted = sumfleet(
            "submit", str(corpus), "--max-new-tokens", "24", "--long-documents", strategy, settings=settings
        )
        assert submitted.returncode == 0, submitted.stderr.decode()
        batch_ids[strategy] = submitted.stdout.decode().strip()
    worker = start_worker(settings, "smollm2")
    client = Client(settings, migrate=False)
    rows = {}
    for strategy, batch_id in batch_ids.items():
        wait_for(partial(_done, client, batch_id), 600, "the batch to finish", poll=1)
        rows[strategy] = {r["id"]: r for r in client.results(batch_id)}
    assert all(r["status"] == "succeeded" and r["summary"] for batch in rows.values() for r in batch.values()), (
        worker.text()
    )
    mapped, cut = rows["map-reduce"]["report"], rows["truncate"]["report"]
    assert mapped["pieces"] >= 7 and mapped["levels"] >= 2 and mapped["prompt_tokens"] > 3500
    assert (cut["pieces"], cut["levels"]) == (1, 1) and cut["prompt_tokens"] <= 512
    assert (rows["map-reduce"][short["id"]]["pieces"], rows["map-reduce"][short["id"]]["levels"]) == (1, 1)
