"""Leases and the time limit follow progress (`worker.heartbeat`), on real worker processes,
PostgreSQL and Redis: a slow chunk that keeps generating is never killed nor taken over, however
long it runs; a process whose generation is stuck ends itself and its jobs are taken back at once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from models.claims import claim_jobs
from models.db import ensure_schema, open_database, session_factory
from models.job_writer import add_jobs
from models.settings import Settings
from models.store import create_batch
from models.tables import Job
from producer.client import Client
from tests.conftest import wait_for
from worker.heartbeat import Heartbeat

pytestmark = pytest.mark.services
PACED = "python:tests.worker.toy_backend:paced"


def _settings(fleet_settings: Settings) -> Settings:
    return fleet_settings.model_copy(
        update={
            "task_time_limit": 3,  # no progress for 3 s: stuck (and, before, a chunk's whole time limit)
            "lease_grace": 0,
            "visibility_timeout": 600,
            "sweep_interval": 0.3,  # a sweeper that would take an expired lease over at once
            "republish_after": 600.0,
            "chunk_size": 8,
        }
    )


def test_a_slow_chunk_that_progresses_outlives_the_time_limit(fleet_settings: Settings, start_worker) -> None:
    settings = _settings(fleet_settings)
    client = Client(settings)
    client.ensure_schema()
    worker = start_worker(settings, PACED)
    worker.wait_ready(120)
    sweeper = start_worker(settings.model_copy(update={"queue": f"{settings.queue}-other"}), "lead")
    sweeper.wait_ready(120)
    documents = [f"SLOW document {i} first. Then more." for i in range(8)]  # one chunk of ~8 s, limit 3 s
    batch_id = client.submit(documents, model=PACED).batch_id
    status = wait_for(lambda: (s := client.status(batch_id)).done and s, 120, "the slow chunk", poll=0.5)
    assert status.counts == {"succeeded": 8}, worker.text()[-3000:]
    rows = list(client.results(batch_id))
    assert all(r["attempts"] == 1 for r in rows), rows  # never killed, never taken over
    assert len({r["worker"] for r in rows}) == 1
    assert "no generation progress" not in worker.text()
    assert "republished" not in sweeper.text() and "republished" not in worker.text()


def test_a_stuck_generation_ends_its_process_and_its_jobs_are_taken_back(
    fleet_settings: Settings, start_worker
) -> None:
    settings = _settings(fleet_settings).model_copy(update={"chunk_size": 4})
    client = Client(settings)
    client.ensure_schema()
    worker = start_worker(settings, PACED)
    worker.wait_ready(120)
    documents = [{"id": f"d{i}", "text": f"Fine document {i} first. More."} for i in range(4)]
    documents[2]["text"] = "This HANG document never finishes. Ever."
    batch_id = client.submit(documents, model=PACED).batch_id
    status = wait_for(lambda: (s := client.status(batch_id)).done and s, 240, "the batch", poll=0.5)
    assert status.counts == {"succeeded": 3, "failed": 1}, worker.text()[-4000:]
    rows = {r["id"]: r for r in client.results(batch_id)}
    stuck = rows.pop("d2")
    assert stuck["attempts"] == settings.max_attempts
    assert stuck["error"].startswith("gave up after 3 attempts: the worker process died")
    assert all(r["summary"] for r in rows.values())
    log = worker.text()
    assert log.count("no generation progress for") == settings.max_attempts, log[-4000:]
    assert "republished" in log  # by the parent, at once: no lease had to run out
    assert client.verify(batch_id) == []


def test_the_heartbeat_renews_only_while_generation_advances(pg_url: str) -> None:
    database = open_database(pg_url)
    ensure_schema(database, migrate=True)
    sessions = session_factory(database)
    with sessions.begin() as session:
        batch = create_batch(
            session,
            model="lead",
            queue="q-heartbeat",
            prompt_name="custom",
            prompt_template="{document}",
            params={},
            source=None,
        )
        batch_id = batch.id
        add_jobs(session, batch, [{"doc_id": f"h{i}", "text": "A. B."} for i in range(3)])
    with sessions() as session:
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)))
    with sessions.begin() as session:
        claim_jobs(session, ids[:2], "me:1", lease_seconds=5)
        claim_jobs(session, ids[2:], "other:2", lease_seconds=5)

    def leases() -> dict[int, object]:
        with sessions() as session:
            return dict(session.execute(select(Job.id, Job.lease_expires_at).where(Job.id.in_(ids))).all())

    stalls: list[bool] = []
    heartbeat = Heartbeat(sessions, "me:1", lease_seconds=600, limit=3600, on_stall=lambda: stalls.append(True))
    before = leases()
    heartbeat.hold(ids)  # the third is another worker's: never renewed by this one
    heartbeat.check()
    after = leases()
    assert after[ids[0]] > before[ids[0]] + timedelta(seconds=500)
    assert after[ids[1]] > before[ids[1]] + timedelta(seconds=500)
    assert after[ids[2]] == before[ids[2]]
    heartbeat.progress([ids[0]])  # its result is committed: no longer held
    heartbeat.limit = 0.0  # and from now on, no progress is recent enough
    heartbeat.check()
    assert stalls == [True] and leases() == after  # stalled: nothing renewed
    heartbeat.release()
    heartbeat.check()
    assert stalls == [True]  # nothing held: nothing to watch
