"""A worker's start on real parts: it waits for a database that is still coming up, and it runs its
sweeper on every broker URL form it accepts (a Redis unix socket, `redis+socket://`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from models.settings import Settings
from producer.client import Client
from tests.conftest import ROOT, wait_for
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.services


def test_a_worker_waits_for_the_database_to_come_up(fleet_settings: Settings, start_worker) -> None:
    client = Client(fleet_settings)
    client.ensure_schema()
    proxy = Proxy(("127.0.0.1", 5432))  # not started yet: connections are refused, as while PostgreSQL starts
    through_proxy = fleet_settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    worker = start_worker(fleet_settings.model_copy(update={"database_url": through_proxy}), "lead")
    wait_for(lambda: "waiting for the database" in worker.text(), 60, "the worker to say what it waits for")
    time.sleep(4)  # several retries, with backoff
    assert worker.process.poll() is None, worker.text()  # still there, not exited
    assert "retrying in 1s" in worker.text() and "retrying in 2s" in worker.text()
    assert "Connection refused" in worker.text() or "connection refused" in worker.text()
    proxy.start()  # the database is up
    try:
        worker.wait_ready(120)
        batch_id = client.submit([f"Document {i} first. Second." for i in range(8)], model="lead").batch_id
        status = wait_for(lambda: (s := client.status(batch_id)).done and s, 60, "the batch")
        assert status.counts == {"succeeded": 8} and client.verify(batch_id) == []
    finally:
        worker.stop()
        proxy.cut()


def test_a_worker_refuses_wrong_database_credentials_at_once(fleet_settings: Settings) -> None:
    from tests.conftest import sumfleet

    wrong = fleet_settings.model_copy(
        update={"database_url": fleet_settings.database_url.replace("postgres@", "nobody:secret@", 1)}
    )
    started = time.monotonic()
    done = sumfleet("worker", "--model", "lead", settings=wrong, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30  # waiting would not fix it
    message = done.stderr.decode()
    assert "cannot reach database" in message and "nobody" in message, message


def test_a_worker_without_a_database_url_refuses_the_default_sqlite_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMFLEET_")}
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker", "--model", "lead"],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    message = done.stderr.decode()
    assert done.returncode == 1, message
    assert "no database given: set SUMFLEET_DATABASE_URL (or --database-url)" in message
    assert "pass --database-url sqlite:///sumfleet.db" in message
    assert not (tmp_path / "sumfleet.db").exists()  # nothing was created where nobody else would look


def test_a_worker_on_another_database_says_so_for_chunks_it_cannot_find(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    client = Client(fleet_settings)
    client.ensure_schema()
    elsewhere = fleet_settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'local.db'}"})
    Client(elsewhere, migrate=True).ensure_schema()
    worker = start_worker(elsewhere, "lead")  # the same broker and queue, another database
    worker.wait_ready(120)
    batch_id = client.submit(["One first. Second."], model="lead").batch_id
    wait_for(lambda: f"batch {batch_id} is not in this worker's database" in worker.text(), 60, "the worker's error")
    assert "give this worker the same SUMFLEET_DATABASE_URL as submit and the API" in worker.text()
    assert worker.process.poll() is None  # it goes on serving its own database
    assert client.status(batch_id).counts == {"queued": 1}  # the batch waits for a worker of its database


@pytest.fixture
def socket_redis() -> Iterator[str]:
    """A Redis server of the test's own on a unix socket (no TCP port): its `redis+socket://` URL."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    folder = Path(tempfile.mkdtemp(prefix="sfredis", dir="/tmp"))  # a socket path must stay short
    socket = folder / "redis.sock"
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(socket), "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: socket.exists(), 30, "redis-server to listen on its socket")
        yield f"redis+socket://{socket}"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_worker_on_a_redis_socket_url_runs_its_sweeper(
    fleet_settings: Settings, start_worker, socket_redis: str
) -> None:
    settings = fleet_settings.model_copy(
        update={"broker_url": socket_redis, "sweep_interval": 0.5, "republish_after": 1.0}
    )
    client = Client(settings)
    client.ensure_schema()
    batch_id = client.submit([f"Document {i} first. Second." for i in range(8)], model="lead", publish=False).batch_id
    worker = start_worker(settings, "lead")  # committed but never published: only the sweeper can publish it
    status = wait_for(lambda: (s := client.status(batch_id)).done and s, 90, "the sweeper to publish the batch")
    assert status.counts == {"succeeded": 8} and client.verify(batch_id) == []
    log = worker.text()
    assert f"republished 2 chunk(s) of batch {batch_id}" in log and "it was never published" in log
    assert "ValueError" not in log and "sweep failed" not in log, log
    broker = redis.Redis(unix_socket_path=socket_redis.removeprefix("redis+socket://"))
    try:
        # the sweeper's lock (held for 0.45 s of every 0.5 s sweep) lives on the broker the URL names
        wait_for(lambda: broker.exists("sumfleet:sweeper"), 30, "the sweeper's lock on the socket's Redis", poll=0.02)
    finally:
        broker.close()
