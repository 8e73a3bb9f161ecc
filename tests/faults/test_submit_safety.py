"""Submission is safe to retry: a committed batch is never reported as failed, and an
idempotency key makes a retry return the first batch instead of summarizing the corpus twice."""

from __future__ import annotations

import threading

import pytest
import redis
from sqlalchemy import event
from sqlalchemy.orm import Session

from models.errors import NotPublished
from models.settings import Settings
from models.tables import Batch
from producer.client import Client
from tests.conftest import SAMPLE, sumfleet, wait_for

pytestmark = pytest.mark.services


def test_database_blip_after_commit_reports_the_saved_batch_and_it_runs_once(
    fleet_settings: Settings, start_worker
) -> None:
    from tests.faults.proxy import Proxy

    proxy = Proxy(("127.0.0.1", 5432))
    proxy.start()
    through_proxy = fleet_settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    client = Client(fleet_settings.model_copy(update={"database_url": through_proxy}))
    client.ensure_schema()
    direct = Client(fleet_settings)

    def cut_after_commit(session: Session, batch: Batch) -> None:  # PostgreSQL goes away right after the commit
        event.listen(session, "after_commit", lambda _session: proxy.cut())

    documents = [{"id": f"d{i}", "text": f"Document {i} says one thing. Then another."} for i in range(300)]
    with pytest.raises(NotPublished) as raised:
        client.submit(documents, model="lead", before_commit=cut_after_commit)
    saved = raised.value
    assert saved.accepted == 300
    assert f"batch {saved.batch_id} is saved (300 documents)" in str(saved) and "Do not submit it again" in str(saved)
    assert direct.status(saved.batch_id).counts == {"queued": 300}  # committed, nothing published
    proxy.start()

    # a worker's sweeper publishes the saved batch; each document is summarized exactly once
    fast = fleet_settings.model_copy(update={"sweep_interval": 0.5, "republish_after": 1.0})
    start_worker(fast, "lead").wait_ready(120)
    status = wait_for(lambda: (s := direct.status(saved.batch_id)).done and s, 120, "the sweeper to run the batch")
    proxy.cut()
    assert status.counts == {"succeeded": 300}
    rows = list(direct.results(saved.batch_id))
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in documents)
    assert all(r["attempts"] == 1 for r in rows)


def test_idempotency_key_makes_a_retried_submit_return_the_first_batch(fleet_settings: Settings) -> None:
    settings = fleet_settings.model_copy(update={"model": "lead"})
    client = Client(settings)
    broker = redis.Redis.from_url(settings.broker_url)
    first = sumfleet("submit", str(SAMPLE), "--idempotency-key", "nightly-2026-11-29", settings=settings)
    assert first.returncode == 0, first.stderr.decode()
    batch_id = first.stdout.decode().strip()
    messages = broker.llen(str(settings.queue))
    batches = len(client.batches(10_000))

    again = sumfleet("submit", str(SAMPLE), "--idempotency-key", "nightly-2026-11-29", settings=settings)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode().strip() == batch_id
    assert "already submitted with this idempotency key" in again.stderr.decode()
    reused = client.submit(["Other text, same key."], model="lead", idempotency_key="nightly-2026-11-29")
    assert (reused.batch_id, reused.reused, reused.accepted) == (batch_id, True, 8)
    assert len(client.batches(10_000)) == batches and broker.llen(str(settings.queue)) == messages

    other = sumfleet("submit", str(SAMPLE), "--idempotency-key", "nightly-2026-11-30", settings=settings)
    assert other.returncode == 0 and other.stdout.decode().strip() != batch_id
    assert len(client.batches(10_000)) == batches + 1
    with pytest.raises(Exception, match="idempotency key must be 1-255 characters"):
        client.submit(["text"], model="lead", idempotency_key="k" * 256)
    broker.close()


def test_concurrent_submits_with_one_key_make_one_batch(fleet_settings: Settings) -> None:
    clients = [Client(fleet_settings) for _ in range(4)]
    for client in clients:
        client.ensure_schema()
    before = len(clients[0].batches(10_000))
    start = threading.Barrier(len(clients))
    found: list[str] = []

    def submit(client: Client) -> None:
        start.wait()
        found.append(
            client.submit([f"Doc {i}. More." for i in range(50)], model="lead", idempotency_key="race").batch_id
        )

    threads = [threading.Thread(target=submit, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 4 and len(set(found)) == 1
    assert len(clients[0].batches(10_000)) == before + 1


def test_republishing_keeps_the_chunk_size_the_batch_was_submitted_with(fleet_settings: Settings) -> None:
    """A sweeper with its own SUMFLEET_CHUNK_SIZE (32) republishes a `--chunk-size 3` batch in 3s."""
    from models.broker import publish_batch

    client = Client(fleet_settings.model_copy(update={"chunk_size": 3}))
    submission = client.submit([f"Doc {i}. More." for i in range(10)], model="lead")
    assert submission.chunks == 4
    broker = redis.Redis.from_url(fleet_settings.broker_url)
    broker.delete(str(fleet_settings.queue))  # the broker lost its messages
    assert publish_batch(client.app, client.sessions, submission.batch_id, 32) == 4
    assert broker.llen(str(fleet_settings.queue)) == 4
    broker.close()


def test_a_sweep_leaves_alone_a_batch_submitted_moments_ago_that_is_not_published_yet(
    fleet_settings: Settings,
) -> None:
    """Regression: between submit's commit and its publish a sweep saw the batch as never published and
    published it a second time (a test's worker log said "republished 1 chunk(s) ... never published")."""
    from models.broker import create_app
    from worker.sweeper import Sweeper

    settings = fleet_settings.model_copy(update={"model": "lead", "republish_after": 600.0})
    client = Client(settings)
    batch_id = client.submit(["One. Two."], model="lead", publish=False).batch_id  # committed, publish to come
    broker = redis.Redis.from_url(settings.broker_url)
    sweeper = Sweeper(client.sessions, create_app(settings), settings)
    report = sweeper.sweep()
    assert report.acted and report.chunks == 0 and broker.llen(str(settings.queue)) == 0
    # once the batch is older than the window, a publish that never came is made up for
    sweeper.settings = settings.model_copy(update={"republish_after": 0.001})
    broker.delete("sumfleet:sweeper")  # the lock the first sweep holds for most of an interval
    assert sweeper.sweep().chunks == 1 and client.status(batch_id).counts == {"queued": 1}
