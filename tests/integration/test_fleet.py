"""The distributed pipeline on real parts: PostgreSQL, Redis, `sumfleet` CLI and worker subprocesses."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from models.settings import Settings
from models.tables import Batch
from producer.client import Client
from tests.conftest import SAMPLE, RedisReservation, sumfleet, wait_for

pytestmark = pytest.mark.services


def _queue_length(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.broker_url)
    try:
        return int(client.llen(str(settings.queue)))
    finally:
        client.close()


def test_submit_worker_status_results(fleet_settings: Settings, start_worker, tmp_path: Path) -> None:
    submitted = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=fleet_settings)
    assert submitted.returncode == 0, submitted.stderr.decode()
    batch_id = submitted.stdout.decode().strip()
    assert batch_id.startswith("b") and "\n" not in batch_id  # the id alone on stdout
    assert "8 documents in 2 chunks" in submitted.stderr.decode()
    assert _queue_length(fleet_settings) == 2  # chunk messages, published before any worker runs

    client = Client(fleet_settings, migrate=False)
    assert client.status(batch_id).counts == {"queued": 8}

    worker = start_worker(fleet_settings, "lead")
    status = wait_for(lambda: (s := client.status(batch_id)).done and s, 120, "the batch to finish")
    assert status.state == "completed"
    assert status.counts == {"succeeded": 8}
    assert client.verify(batch_id) == []
    assert _queue_length(fleet_settings) == 0

    shown = sumfleet("status", batch_id, "--json", settings=fleet_settings)
    assert shown.returncode == 0, shown.stderr.decode()
    as_json = json.loads(shown.stdout)
    assert as_json["state"] == "completed" and as_json["counts"]["succeeded"] == 8
    assert as_json["docs_per_second"] > 0

    listed = sumfleet("batches", settings=fleet_settings)
    assert batch_id in listed.stdout.decode()

    out = tmp_path / "results.jsonl"
    exported = sumfleet("results", batch_id, "-o", str(out), settings=fleet_settings)
    assert exported.returncode == 0, exported.stderr.decode()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sources = {json.loads(line)["id"]: json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()}
    assert [r["id"] for r in rows] == list(sources)  # the documents' own ids, in input order
    for row in rows:
        assert row["status"] == "succeeded" and row["error"] is None
        assert sources[row["id"]].startswith(row["summary"].split(". ")[0])  # lead: the first sentences
        assert row["worker"].endswith(f":{row['worker'].split(':')[-1]}") and row["attempts"] == 1
        assert row["started_at"] and row["finished_at"] and row["output_tokens"] > 0
    assert len({r["worker"] for r in rows}) == 1 and worker.process.pid != int(rows[0]["worker"].split(":")[-1])

    csv_out = tmp_path / "results.csv"
    assert sumfleet("results", batch_id, "-o", str(csv_out), settings=fleet_settings).returncode == 0
    with csv_out.open(newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["id"] for r in csv_rows] == list(sources)
    assert csv_rows[0]["summary"] == rows[0]["summary"]


def test_two_workers_share_a_batch_and_no_job_runs_twice(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    settings = fleet_settings.model_copy(update={"chunk_size": 2})
    workers = [start_worker(settings, "lead"), start_worker(settings, "lead")]
    for worker in workers:
        worker.wait_ready(120)
    documents = [
        {"id": f"doc-{i}", "text": f"Sentence one of document {i}. Sentence two. Sentence three. Four."}
        for i in range(120)
    ]
    client = Client(settings)
    submission = client.submit(documents, model="lead")
    assert (submission.accepted, submission.chunks) == (120, 60)
    status = wait_for(lambda: (s := client.status(submission.batch_id)).done and s, 180, "the batch")
    assert status.counts == {"succeeded": 120}
    assert client.verify(submission.batch_id) == []

    rows = list(client.results(submission.batch_id))
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in documents)
    assert all(r["attempts"] == 1 for r in rows), "a job was claimed twice"
    per_worker = Counter(r["worker"] for r in rows)
    assert len(per_worker) == 2, f"both worker processes should have taken chunks: {per_worker}"
    for row in rows:
        assert row["summary"] == f"Sentence one of document {row['id'][4:]}. Sentence two. Sentence three."


def test_submit_is_all_or_nothing_on_bad_rows(fleet_settings: Settings, tmp_path: Path) -> None:
    corpus = tmp_path / "dirty.jsonl"
    corpus.write_text('{"id": "a", "text": "Fine."}\n{"id": "b", "text": ""}\n{"id": "c" "text": "x"}\n')
    refused = sumfleet("submit", str(corpus), "--model", "lead", settings=fleet_settings)
    assert refused.returncode == 1
    message = refused.stderr.decode()
    assert f'{corpus}:2: field "text" is empty' in message
    assert f"{corpus}:3: malformed JSON" in message
    assert "nothing was submitted" in message
    assert refused.stdout == b""
    assert _queue_length(fleet_settings) == 0
    client = Client(fleet_settings, migrate=False)
    assert all(b.source != str(corpus) for b in client.batches(1000))

    skipped = sumfleet("submit", str(corpus), "--model", "lead", "--skip-bad-rows", settings=fleet_settings)
    assert skipped.returncode == 0, skipped.stderr.decode()
    assert "skipped 2 bad row(s)" in skipped.stderr.decode()
    batch_id = skipped.stdout.decode().strip()
    assert client.status(batch_id).total == 1
    assert _queue_length(fleet_settings) == 1


def test_unreachable_broker_leaves_nothing_behind(fleet_settings: Settings) -> None:
    client = Client(fleet_settings)
    before = len(client.batches(10_000))
    dead = fleet_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    refused = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=dead)
    assert refused.returncode == 1
    assert "cannot reach the broker at redis://127.0.0.1:1/0" in refused.stderr.decode()
    assert refused.stdout == b""
    assert len(client.batches(10_000)) == before


def test_cancel_before_the_workers_reach_the_batch(fleet_settings: Settings, start_worker) -> None:
    submitted = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=fleet_settings)
    batch_id = submitted.stdout.decode().strip()
    cancelled = sumfleet("cancel", batch_id, settings=fleet_settings)
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    assert "cancelled 8 job(s) not running; 0 running stop after their current generation batch" in (
        cancelled.stderr.decode()
    )
    start_worker(fleet_settings, "lead")
    wait_for(lambda: _queue_length(fleet_settings) == 0, 120, "the worker to drain the queue")
    client = Client(fleet_settings, migrate=False)
    status = client.status(batch_id)
    assert (status.state, status.counts) == ("cancelled", {"cancelled": 8})
    again = sumfleet("cancel", batch_id, settings=fleet_settings)
    assert again.returncode == 1 and "already ended (cancelled)" in again.stderr.decode()


def test_status_verify_finds_and_repairs_counters_and_prune_deletes_ended_batches(
    fleet_settings: Settings, own_database: str
) -> None:
    fleet_settings = fleet_settings.model_copy(update={"database_url": own_database})
    batch_id = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=fleet_settings).stdout.decode().strip()
    verified = sumfleet("status", batch_id, "--verify", settings=fleet_settings)
    assert verified.returncode == 0 and "counters agree with a recount" in verified.stderr.decode()
    client = Client(fleet_settings, migrate=False)
    with client.sessions.begin() as session:  # a counter gone wrong (as a bug or a hand edit would leave it)
        session.execute(update(Batch).where(Batch.id == batch_id).values(jobs_queued=5, jobs_failed=2))
    wrong = sumfleet("status", batch_id, "--verify", settings=fleet_settings)
    assert wrong.returncode == 1, wrong.stderr.decode()
    assert "counter disagrees with the jobs: queued: counter 5, jobs 8" in wrong.stderr.decode()
    assert "failed: counter 2, jobs 0" in wrong.stderr.decode()
    repaired = sumfleet("status", batch_id, "--repair", settings=fleet_settings)
    assert repaired.returncode == 0 and "counters repaired" in repaired.stderr.decode()
    assert client.verify(batch_id) == [] and client.status(batch_id).counts == {"queued": 8}

    assert sumfleet("cancel", batch_id, settings=fleet_settings).returncode == 0
    kept = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=fleet_settings).stdout.decode().strip()
    pruned = sumfleet("prune", "--finished-before", "2999-01-01", settings=fleet_settings)
    assert pruned.returncode == 0, pruned.stderr.decode()
    assert "pruned 1 batch(es)" in pruned.stderr.decode() and ", 8 job(s)" in pruned.stderr.decode()
    gone = sumfleet("status", batch_id, settings=fleet_settings)
    assert gone.returncode == 1 and f"no batch '{batch_id}'" in gone.stderr.decode()
    assert client.status(kept).counts == {"queued": 8}  # a batch still running is never pruned
    bad = sumfleet("prune", "--finished-before", "last week", settings=fleet_settings)
    assert bad.returncode == 1 and "--finished-before: 'last week' is not an ISO date" in bad.stderr.decode()


def test_requeue_after_the_broker_lost_everything(
    fleet_settings: Settings, redis_reservation: RedisReservation
) -> None:
    first = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=fleet_settings).stdout.decode().strip()
    second = sumfleet("submit", str(SAMPLE), "--model", "lead", settings=fleet_settings).stdout.decode().strip()
    assert _queue_length(fleet_settings) == 4
    redis_reservation.flush()
    one = sumfleet("requeue", first, settings=fleet_settings)
    assert one.returncode == 0 and f"batch {first}: published 2 chunk(s)" in one.stderr.decode()
    assert _queue_length(fleet_settings) == 2
    every = sumfleet("requeue", settings=fleet_settings)
    assert f"batch {second}: published 2 chunk(s)" in every.stderr.decode()
    assert _queue_length(fleet_settings) >= 4
