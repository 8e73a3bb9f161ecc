"""The chunk processor (the task body) on SQLite with the lead engine and a faulty engine."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from models.claims import ClaimedJob, JobOutcome
from models.prompts import PromptPlan
from models.settings import Settings
from models.states import JobState
from models.store import iter_job_id_chunks
from producer.client import Client
from worker.chunk import ChunkProcessor
from worker.engine import GenerationParams
from worker.lead import LeadEngine


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[Client]:
    client = Client(sqlite_settings)
    yield client
    client.close()


def _ids(client: Client, batch_id: str) -> list[int]:
    return [i for c in iter_job_id_chunks(client.sessions, batch_id, 1000, list(JobState)) for i in c]


def test_a_chunk_runs_once_and_a_redelivery_does_nothing(client: Client) -> None:
    sub = client.submit(["One. Two. Three. Four.", "Alpha. Beta."], model="lead", publish=False)
    processor = ChunkProcessor(client.sessions, LeadEngine("lead", 3), "w1")
    seen: list[int] = []
    report = processor.process(
        sub.batch_id, _ids(client, sub.batch_id), on_batch=lambda o: seen.extend(x.job_id for x in o)
    )
    assert (report.claimed, report.succeeded, report.written) == (2, 2, 2)
    assert len(seen) == 2
    again = ChunkProcessor(client.sessions, LeadEngine("lead", 3), "w2").process(
        sub.batch_id, _ids(client, sub.batch_id)
    )
    assert (again.claimed, again.written) == (0, 0)
    rows = list(client.results(sub.batch_id))
    assert [r["summary"] for r in rows] == ["One. Two. Three.", "Alpha. Beta."]
    assert {r["worker"] for r in rows} == {"w1"} and client.status(sub.batch_id).state == "completed"


def test_a_worker_for_another_model_fails_the_jobs_with_the_reason(client: Client) -> None:
    sub = client.submit(["Some text."], model="lead-2", publish=False)
    ChunkProcessor(client.sessions, LeadEngine("lead", 3), "w").process(sub.batch_id, _ids(client, sub.batch_id))
    (row,) = client.results(sub.batch_id)
    assert row["status"] == "failed"
    assert "asks for model 'lead-2', but this worker serves 'lead'" in row["error"]


class _BreaksAfterOneBatch:
    """An engine whose first generation batch works and whose second raises (a bug, say)."""

    name = "lead"

    def run(
        self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams
    ) -> Iterator[list[JobOutcome]]:
        yield [JobOutcome(jobs[0].id, summary="fine")]
        raise ValueError("engine bug")


def test_an_engine_error_fails_only_the_jobs_still_open(client: Client) -> None:
    sub = client.submit(["a.", "b.", "c."], model="lead", publish=False)
    report = ChunkProcessor(client.sessions, _BreaksAfterOneBatch(), "w").process(
        sub.batch_id, _ids(client, sub.batch_id)
    )
    assert (report.succeeded, report.failed) == (1, 2)
    rows = list(client.results(sub.batch_id))
    assert [r["status"] for r in rows] == ["succeeded", "failed", "failed"]
    assert rows[1]["error"] == "ValueError: engine bug"
    assert client.status(sub.batch_id).state == "completed"  # every job has an outcome


class _SlowEngine:
    """An engine that takes a known time for each of its two generation batches."""

    name = "lead"

    def run(
        self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams
    ) -> Iterator[list[JobOutcome]]:
        for job in jobs:
            time.sleep(0.3)
            yield [JobOutcome(job.id, summary="done")]


def test_a_chunk_reports_its_time_generating_apart_from_its_database_work(client: Client) -> None:
    sub = client.submit(["a.", "b."], model="lead", publish=False)
    report = ChunkProcessor(client.sessions, _SlowEngine(), "w").process(
        sub.batch_id, _ids(client, sub.batch_id), on_batch=lambda _: time.sleep(0.5)
    )
    assert report.succeeded == 2
    # the engine's sleeps count as generating; the callback after each batch's commit as the work around
    # it (lower bounds only: each second is counted in one of the two, never both)
    assert report.generate_seconds >= 0.6 and report.bookkeeping_seconds >= 1.0


def test_python_api_rejects_bad_documents_and_writes_nothing(client: Client) -> None:
    from models.errors import InputError

    documents: list[Any] = [  # an int is no document: the check must say so
        "fine",
        "  ",
        {"id": "x"},
        {"id": "d", "text": 5},
        7,
        {"id": "d2", "text": "ok"},
        {"id": "d2", "text": "again"},
    ]
    with pytest.raises(InputError) as caught:
        client.submit(
            documents,
            model="lead",
            publish=False,
        )
    reasons = [str(p) for p in caught.value.problems]
    assert reasons == [
        "<python>:2: the text is empty",
        '<python>:3: missing text: no "text" or "document" string',
        '<python>:4: field "text" must be a string, got int',
        "<python>:5: expected a string or a mapping, got int",
        '<python>:7: duplicate id "d2" (first seen at item 6)',
    ]
    assert client.batches() == []
    skipped = client.submit(["fine", "  "], model="lead", publish=False, skip_bad_rows=True)
    assert skipped.accepted == 1 and len(skipped.problems) == 1


def test_cancel_stops_queued_jobs_and_keeps_finished_results(client: Client) -> None:
    from models.errors import InvalidTransition

    sub = client.submit(["a. b.", "c. d.", "e. f."], model="lead", publish=False)
    ids = _ids(client, sub.batch_id)
    processor = ChunkProcessor(client.sessions, LeadEngine("lead", 1), "w")
    processor.process(sub.batch_id, ids[:1])
    assert client.cancel(sub.batch_id) == (2, 0)
    report = processor.process(sub.batch_id, ids)  # a chunk delivered after the cancel
    assert report.claimed == 0
    status = client.status(sub.batch_id)
    assert status.state == "cancelled" and status.done
    assert status.counts == {"succeeded": 1, "cancelled": 2}
    assert [r["status"] for r in client.results(sub.batch_id)] == ["succeeded", "cancelled", "cancelled"]
    assert next(iter(client.results(sub.batch_id)))["summary"] == "a."
    with pytest.raises(InvalidTransition, match="already ended \\(cancelled\\)"):
        client.cancel(sub.batch_id)
