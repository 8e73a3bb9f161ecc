"""The deployment's checks run for real: the KEDA backlog query on PostgreSQL, the worker probe
against a real `sumfleet worker`, Redis and PostgreSQL.

The query is read from deploy/kubernetes/keda (the exact text KEDA would run) and run on a
database of the test's own after the project's Client submitted batches: it must return the
model's documents not done yet. The probe is docker-compose.yml's x-worker-probe (the same
one-liner the Kubernetes worker Deployments run), run the way Docker and the kubelet run it:
`python -c PROBE`, in the worker's environment.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from models.claims import claim_jobs
from models.db import open_database
from models.settings import Settings
from models.store import mark_batch_started
from models.tables import Job
from producer.client import Client
from tests.conftest import settings_env, wait_for
from tests.test_deploy_kubernetes import backlog_query, compose_probe

pytestmark = pytest.mark.services

SUMFLEET = Path(sys.executable).with_name("sumfleet")  # the console script, as the image's ENTRYPOINT runs it


def backlog(settings: Settings, model: str) -> int:
    database = open_database(settings.database_url)
    try:
        with database.connect() as connection:
            value = connection.execute(text(backlog_query(model))).scalar_one()
    finally:
        database.dispose()
    assert isinstance(value, int), f"KEDA reads a number; the query returned {value!r}"
    return value


def documents(count: int, tag: str) -> list[dict[str, str]]:
    return [
        {"id": f"{tag}-{i}", "text": f"Story {i} of {tag} begins here. It goes on for a while. Then it ends."}
        for i in range(count)
    ]


@pytest.fixture
def settings(own_database: str, redis_url: str) -> Settings:
    return Settings(
        database_url=own_database,
        broker_url=redis_url,
        queue=f"sumfleet.test-{secrets.token_hex(4)}",
        chunk_size=4,
    )


def test_keda_query_returns_each_models_document_backlog(settings: Settings) -> None:
    client = Client(settings)
    try:
        client.ensure_schema()  # what `sumfleet db upgrade` (the migration Job) does
        assert backlog(settings, "smollm2") == 0 == backlog(settings, "lead"), "an empty database has no backlog"
        smollm2 = client.submit(documents(7, "s"), model="smollm2", publish=False)
        lead = client.submit(documents(10, "l"), model="lead", publish=False)
        assert (backlog(settings, "smollm2"), backlog(settings, "lead")) == (7, 10)

        # A worker claims 4 of lead's documents: running documents are still backlog.
        with client.sessions.begin() as session:
            ids = session.scalars(select(Job.id).where(Job.batch_id == lead.batch_id).order_by(Job.id)).all()
            assert len(claim_jobs(session, ids[:4], "test-host:1", 600)) == 4
            mark_batch_started(session, lead.batch_id)
        assert client.status(lead.batch_id).state == "running"
        assert backlog(settings, "lead") == 10

        # Cancelling a batch takes its documents out of the backlog (queued ones at once).
        client.cancel(smollm2.batch_id)
        assert backlog(settings, "smollm2") == 0
        assert backlog(settings, "lead") == 10
    finally:
        client.close()


class Worker:
    """`sumfleet worker` started as the image starts it (the console script), in its own process group."""

    def __init__(self, settings: Settings, model: str, log: Path) -> None:
        self.log = log
        self.handle = log.open("wb")
        self.process = subprocess.Popen(
            [str(SUMFLEET), "worker", "--model", model, "--concurrency", "1"],
            env=settings_env(settings),
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "ready with model" not in self.text():
            assert self.process.poll() is None, f"the worker exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"the worker is not ready after {timeout}s:\n{self.text()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.handle.close()


@pytest.fixture
def start_lead_worker(settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    assert SUMFLEET.is_file(), f"no sumfleet console script beside {sys.executable}"
    migrated = subprocess.run(  # the migration Job / compose's `migrate`
        [str(SUMFLEET), "db", "upgrade"], env=settings_env(settings), capture_output=True, text=True, timeout=300
    )
    assert migrated.returncode == 0, migrated.stderr
    worker = Worker(settings, "lead", tmp_path / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


def probe(settings: Settings, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    env = settings_env(settings) | overrides
    return subprocess.run(
        [sys.executable, "-c", compose_probe(), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_worker_probe_and_backlog_with_a_real_worker(settings: Settings, start_lead_worker: Worker) -> None:
    other_workers = probe(settings, "live").returncode == 0  # another `sumfleet worker` on this machine
    worker = start_lead_worker
    worker.wait_ready()

    healthy = probe(settings)
    assert healthy.returncode == 0, f"the probe fails against a running worker:\n{healthy.stderr}"
    assert probe(settings, "live").returncode == 0

    no_broker = probe(settings, SUMFLEET_BROKER_URL="redis://127.0.0.1:1/0")
    assert no_broker.returncode != 0 and "broker" in no_broker.stderr, no_broker.stderr
    no_database = probe(settings, SUMFLEET_DATABASE_URL=settings.database_url.replace(":5432/", ":1/"))
    assert no_database.returncode != 0 and "OperationalError" in no_database.stderr, no_database.stderr
    assert probe(settings, "live", SUMFLEET_BROKER_URL="redis://127.0.0.1:1/0").returncode == 0, (
        "liveness checks the process only: a broker outage must not restart the worker"
    )

    # The worker drains a batch: the backlog KEDA reads goes from the batch's size to 0.
    client = Client(settings)
    try:
        batch = client.submit(documents(12, "drain"), model="lead")
        wait_for(lambda: client.status(batch.batch_id).done, 120, "the worker to finish the batch")
        assert client.status(batch.batch_id).counts.get("succeeded") == 12
        assert backlog(settings, "lead") == 0
    finally:
        client.close()

    worker.stop()
    if not other_workers:
        gone = probe(settings, "live")
        assert gone.returncode != 0 and "no sumfleet worker process" in gone.stderr, gone.stderr
