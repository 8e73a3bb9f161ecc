"""Cancelling a batch while its work is claimed, on real parts: a chunk stops between generation
batches, a dead worker's jobs end cancelled, and an ended batch is never published again."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from models.settings import Settings
from producer.client import Client
from tests.conftest import WorkerProcess, sumfleet, wait_for

pytestmark = pytest.mark.services
HELD = "python:tests.faults.held_engine:make"


def test_cancel_stops_a_claimed_chunk_between_generation_batches(
    fleet_settings: Settings, start_worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "HELD_ENGINE_DELAY", "1.0"
    )  # one document per generation batch, 1 s each (a CLI start on a busy machine takes seconds)
    settings = fleet_settings.model_copy(update={"chunk_size": 16})
    client = Client(settings)
    client.ensure_schema()
    worker = start_worker(settings, HELD)
    worker.wait_ready(120)
    batch_id = client.submit([f"Document {i} first. Second." for i in range(16)], model=HELD).batch_id  # 1 chunk
    wait_for(lambda: client.status(batch_id).counts.get("succeeded"), 60, "the first result")

    cancelled = sumfleet("cancel", batch_id, settings=settings)
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    watched = sumfleet("status", batch_id, "--watch", "--json", "--interval", "0.2", settings=settings, timeout=120)
    final = json.loads(watched.stdout)
    counts = final["counts"]
    assert counts.get("cancelled", 0) >= 6 and counts["succeeded"] + counts["cancelled"] == 16, counts  # stopped early
    assert final["state"] == "cancelled" and "running" not in counts, final  # --watch waited for the running ones
    assert watched.returncode == 3  # not all succeeded
    assert client.status(batch_id).counts == counts  # nothing ran after
    message = cancelled.stderr.decode()  # the whole batch was one claimed chunk: nothing was queued
    assert "cancelled 0 job(s) not running;" in message and "running stop after their current generation batch" in (
        message
    )
    verified = sumfleet("status", batch_id, "--verify", settings=settings)
    assert verified.returncode == 0 and "agree with a recount" in verified.stderr.decode()
    assert f"batch {batch_id} was cancelled: gave up" in worker.text()
    rows = list(client.results(batch_id))
    assert all(r["summary"] == f"Document {int(r['id']) - 1} first. Second." for r in rows if r["summary"])
    assert all(r["status"] == "cancelled" and r["summary"] is None for r in rows[counts["succeeded"] :])


def _held_chunk(settings: Settings, start_worker, gate: Path) -> tuple[Client, str, WorkerProcess]:
    """A batch of 8 whose first chunk of 4 is held running by a worker (until `gate` exists)."""
    client = Client(settings)
    client.ensure_schema()
    worker = start_worker(settings, HELD)
    worker.wait_ready(120)
    documents = [f"WAIT:{gate} Held first. Then more."] + [f"Document {i} first. Second." for i in range(1, 8)]
    batch_id = client.submit(documents, model=HELD).batch_id
    wait_for(lambda: client.status(batch_id).counts.get("running") == 4, 60, "the first chunk to be claimed")
    return client, batch_id, worker


def test_a_dead_workers_jobs_of_a_cancelled_batch_end_cancelled_and_requeue_refuses_it(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    settings = fleet_settings.model_copy(
        update={"task_time_limit": 3, "lease_grace": 0, "visibility_timeout": 600, "sweep_interval": 0.3}
    )
    client, batch_id, worker = _held_chunk(settings, start_worker, tmp_path / "gate")
    os.killpg(worker.process.pid, signal.SIGKILL)  # the worker dies holding 4 jobs
    cancelled = sumfleet("cancel", batch_id, settings=settings)
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    assert client.status(batch_id).state == "cancelled"

    start_worker(settings.model_copy(update={"queue": f"{settings.queue}-other"}), "lead")  # a sweeper
    status = wait_for(
        lambda: (s := client.status(batch_id)).counts == {"cancelled": 8} and s, 60, "the dead worker's jobs"
    )
    assert status.state == "cancelled" and client.verify(batch_id) == []
    refused = sumfleet("requeue", batch_id, settings=settings)
    assert refused.returncode == 1
    assert f"batch {batch_id} has already ended (cancelled)" in refused.stderr.decode()
    assert client.status(batch_id).counts == {"cancelled": 8}  # nothing ran


def test_a_pool_process_killed_in_a_cancelled_batch_leaves_nothing_running(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    settings = fleet_settings.model_copy(  # leases of 660 s: only the worker's parent can end them early
        update={"task_time_limit": 600, "lease_grace": 60, "visibility_timeout": 1200}
    )
    client, batch_id, worker = _held_chunk(settings, start_worker, tmp_path / "gate")
    (holder,) = {r["worker"] for r in client.results(batch_id) if r["status"] == "running"}
    client.cancel(batch_id)
    os.kill(int(holder.rsplit(":", 1)[1]), signal.SIGKILL)  # the pool process dies; its parent lives on
    wait_for(lambda: client.status(batch_id).counts == {"cancelled": 8}, 90, "the dead process's jobs to be cancelled")
    assert client.verify(batch_id) == []
    assert "4 job(s) of cancelled batches cancelled" in worker.text()
