"""A worker fills its engine whatever the chunk size: a task whose chunk is smaller than the
engine's capacity takes more chunks from the queue, and acknowledges them after their results
are committed. Real worker processes, Redis and PostgreSQL; the toy backend records its calls."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import redis

from models.settings import Settings
from producer.client import Client
from tests.conftest import wait_for

pytestmark = pytest.mark.services
MODEL = "python:tests.worker.toy_backend:recording"


def _unacked(broker: redis.Redis, queue: str) -> int:
    """Messages of `queue` delivered and not acknowledged (the db's `unacked` hash holds every queue's:
    kombu stores each as [message, exchange, routing key]; this test's queue is its own)."""
    return sum(json.loads(entry)[2] == queue for entry in broker.hvals("unacked"))


def _documents(count: int) -> list[str]:
    return [f"Document {i} says one thing. Then it says another." for i in range(count)]


def test_eight_chunks_of_four_reach_one_generate_call_of_32_rows(
    fleet_settings: Settings, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    monkeypatch.setenv("TOY_BACKEND_CALLS", str(calls))
    client = Client(fleet_settings)
    client.ensure_schema()
    submission = client.submit(_documents(32), model=MODEL)
    assert submission.chunks == 8  # fleet_settings: chunks of 4
    worker = start_worker(fleet_settings, MODEL)  # started after: all 8 messages wait in the queue
    status = wait_for(lambda: (s := client.status(submission.batch_id)).done and s, 120, "the batch")
    assert status.counts == {"succeeded": 32}, worker.text()
    assert client.verify(submission.batch_id) == []
    assert [int(n) for n in calls.read_text().split()] == [32]  # one call of 32 rows, not 8 of 4
    assert "32 job(s) of 8 chunk(s)" in worker.text()
    broker = redis.Redis.from_url(fleet_settings.broker_url)
    try:
        assert broker.llen(str(fleet_settings.queue)) == 0
        queue = str(fleet_settings.queue)
        wait_for(lambda: _unacked(broker, queue) == 0, 30, "every pulled message to be acknowledged")
    finally:
        broker.close()
    assert all(r["attempts"] == 1 for r in client.results(submission.batch_id))


def test_a_worker_killed_holding_pulled_chunks_loses_nothing(
    fleet_settings: Settings, start_worker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, hold = tmp_path / "calls", tmp_path / "hold"
    monkeypatch.setenv("TOY_BACKEND_CALLS", str(calls))
    monkeypatch.setenv("TOY_BACKEND_HOLD", str(hold))
    settings = fleet_settings.model_copy(
        update={"task_time_limit": 5, "lease_grace": 0, "visibility_timeout": 600, "sweep_interval": 0.5}
    )
    client = Client(settings)
    client.ensure_schema()
    hold.touch()
    submission = client.submit(_documents(32), model=MODEL)
    first = start_worker(settings, MODEL)
    wait_for(lambda: calls.exists() and calls.read_text().split() == ["32"], 60, "the merged call to start")
    os.killpg(first.process.pid, signal.SIGKILL)  # dies holding its own chunk and 7 pulled ones
    first.process.wait(10)
    assert client.status(submission.batch_id).counts == {"running": 32}
    hold.unlink()
    second = start_worker(settings, MODEL)
    status = wait_for(lambda: (s := client.status(submission.batch_id)).done and s, 120, "the take-over", poll=0.5)
    assert status.counts == {"succeeded": 32}, second.text()
    assert client.verify(submission.batch_id) == []
    rows = list(client.results(submission.batch_id))
    assert all(r["summary"] and r["attempts"] == 2 for r in rows)  # each ran once more, none twice more
