"""Taking work over from dead workers and lost messages, on real parts: `sumfleet worker` processes,
PostgreSQL and Redis. What is timed is compared with what the old behaviour needed (a lease of
minutes, a drained queue), never held to tight wall-clock bounds."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from models.broker import recovery_queue_for
from models.settings import Settings
from producer.client import Client
from tests.conftest import RedisReservation, WorkerProcess, wait_for

pytestmark = pytest.mark.services
HELD = "python:tests.faults.held_engine:make"


def _rows(client: Client, batch_id: str) -> list[dict[str, Any]]:
    return list(client.results(batch_id))


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _republished(batch_id: str, *workers: WorkerProcess) -> list[str]:
    """Every log line of `workers` that reports publishing `batch_id`'s work again."""
    return [
        line for worker in workers for line in worker.text().splitlines() if "republished" in line and batch_id in line
    ]


def test_a_killed_pool_process_gives_its_jobs_back_at_once(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    settings = fleet_settings.model_copy(
        update={
            "task_time_limit": 600,
            "lease_grace": 60,  # a lease of 660 s: what a takeover used to wait for
            "visibility_timeout": 1200,
            "sweep_interval": 1.0,
            "republish_after": 600.0,
            "chunk_size": 4,
        }
    )
    lease = settings.task_time_limit + settings.lease_grace
    client = Client(settings)
    client.ensure_schema()
    workers = [start_worker(settings, HELD), start_worker(settings, HELD)]
    for worker in workers:
        worker.wait_ready(120)
    gate = tmp_path / "gate"
    documents = [f"WAIT:{gate} Held first. Then more."] + [f"Document {i} first. Second." for i in range(1, 4)]
    batch_id = client.submit(documents, model=HELD).batch_id
    wait_for(lambda: client.status(batch_id).counts.get("running") == 4, 60, "the chunk to be claimed")
    (holder,) = {row["worker"] for row in _rows(client, batch_id)}
    pid = int(holder.rsplit(":", 1)[1])
    assert all(pid != worker.process.pid for worker in workers)  # a pool process, not a worker's main process

    os.kill(pid, signal.SIGKILL)  # the pool process dies mid-chunk; its parent and the other worker live on
    killed_at = time.monotonic()
    gate.touch()
    status = wait_for(lambda: (s := client.status(batch_id)).done and s, 180, "the jobs to be taken over", poll=0.5)
    took = time.monotonic() - killed_at
    assert status.counts == {"succeeded": 4}, [w.text()[-3000:] for w in workers]
    assert took < lease / 3, took  # the lease alone was 660 s; the parent gave the jobs back within seconds
    assert client.verify(batch_id) == []
    rows = _rows(client, batch_id)
    assert all(r["attempts"] == 2 and r["summary"] and r["worker"] != holder for r in rows), rows  # once more each
    assert [r["summary"] for r in rows] == documents  # lead: each document is its own two sentences
    lines = _republished(batch_id, *workers)
    assert len(lines) == 1 and f"worker process {holder} died" in lines[0], lines  # one recovery, by the parent


def test_an_expired_chunk_is_republished_once_and_ahead_of_new_work(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    settings = fleet_settings.model_copy(
        update={
            # a lease of 20 s from the last renewal: the held chunk makes no progress, and a time limit
            # shorter than the test's own steps on a busy machine would let the process end itself
            # (and its parent republish at once) before the test kills the whole worker
            "task_time_limit": 20,
            "lease_grace": 0,
            "visibility_timeout": 600,
            "sweep_interval": 0.3,
            "republish_after": 600.0,
            "chunk_size": 4,
        }
    )
    queue = str(settings.queue)
    client = Client(settings)
    client.ensure_schema()
    gate = tmp_path / "gate"
    first = start_worker(settings, HELD)
    first.wait_ready(120)
    dead = client.submit(
        [f"WAIT:{gate} Held first. Then more."] + [f"Dead {i} first. Second." for i in range(1, 4)], model=HELD
    ).batch_id
    wait_for(lambda: client.status(dead).counts.get("running") == 4, 60, "the chunk to be claimed")
    os.killpg(first.process.pid, signal.SIGKILL)  # the whole worker dies: only the lease tells
    first.process.wait(10)
    new = client.submit([f"New {i} first. Second." for i in range(16)], model=HELD).batch_id  # 4 chunks, queued

    # a worker of another queue: it never takes these chunks, but its sweeper watches every batch
    sweeping = start_worker(settings.model_copy(update={"queue": f"{queue}-other"}), "lead")
    wait_for(lambda: _republished(dead, sweeping), 120, "the sweeper to republish the expired chunk")
    time.sleep(6)  # twenty more sweeps of the same expired jobs
    assert len(_republished(dead, sweeping)) == 1, _republished(dead, sweeping)
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        assert broker.llen(recovery_queue_for(queue)) == 1  # one message, not one per sweep
        assert broker.llen(queue) == 4  # the new batch's chunks, behind it
    finally:
        broker.close()
    assert client.status(dead).counts == {"queued": 4}

    gate.touch()
    start_worker(settings, HELD)
    wait_for(lambda: client.status(dead).done and client.status(new).done, 120, "both batches", poll=0.5)
    assert client.verify(dead) == [] and client.verify(new) == []
    recovered, fresh = _rows(client, dead), _rows(client, new)
    assert all(r["status"] == "succeeded" and r["attempts"] == 2 for r in recovered), recovered
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in fresh), fresh
    # the recovered chunk ran before any new one, though it was published after them
    assert max(_moment(r["finished_at"]) for r in recovered) <= min(_moment(r["started_at"]) for r in fresh)


def test_lost_messages_are_republished_while_other_batches_keep_the_queue_busy(
    fleet_settings: Settings, start_worker, redis_reservation: RedisReservation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HELD_ENGINE_DELAY", "0.25")  # 1 s per chunk of 4: the busy batch takes about a minute
    settings = fleet_settings.model_copy(update={"sweep_interval": 0.5, "republish_after": 3.0, "chunk_size": 4})
    client = Client(settings)
    client.ensure_schema()
    lost = client.submit([f"Lost {i} first. Second." for i in range(12)], model=HELD).batch_id
    redis_reservation.flush()  # its 3 messages are gone (a Redis restart without persistence)
    busy = client.submit([f"Busy {i} first. Second." for i in range(240)], model=HELD).batch_id  # 60 chunks
    worker = start_worker(settings, HELD)

    done = wait_for(lambda: (s := client.status(lost)).done and s, 120, "the lost batch to be recovered", poll=0.5)
    others = client.status(busy)
    queue_left = redis.Redis.from_url(settings.broker_url).llen(str(settings.queue))
    assert done.counts == {"succeeded": 12}
    # it finished while the busy batch still had most of its work queued, not after the queue drained
    assert not others.done and others.finished < 200 and queue_left > 0, (others.counts, queue_left)
    lines = _republished(lost, worker)
    assert 1 <= len(lines) <= 2 and "the queue moved past its messages" in lines[0], lines  # per window, not sweep
    assert client.verify(lost) == []
    assert all(r["attempts"] == 1 for r in _rows(client, lost))

    client.cancel(busy)  # no need to drain it
    wait_for(lambda: not client.status(busy).counts.get("running"), 60, "the busy batch to stop")
    assert client.verify(busy) == []
    assert not re.search(r"republished .* of batch " + busy, worker.text())  # it made progress all along
