"""Shared fixtures: a fresh PostgreSQL database and Redis db per test run, worker subprocesses.

The service tests need the real Redis and PostgreSQL (SUMFLEET_TEST_PG, SUMFLEET_TEST_REDIS
override where they are); they fail, not skip, when those are down, so CI cannot pass
without them.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from models.settings import Settings

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def _one_core_per_xdist_worker() -> None:
    """Under pytest-xdist (`-n N`), pin each worker process, and so the worker and API processes its
    tests start, to a core of its own: torch, llama.cpp and CTranslate2 size their thread pools by the
    cores a process may use, and two test processes each spinning threads on every core slowed both
    (OpenMP barriers wait for descheduled threads). Runs before anything imports torch."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    cores = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_one_core_per_xdist_worker()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a process per core, at most 8 (each reserves a Redis db of 1-13 and may hold a model)."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


# the maintenance database every PostgreSQL has: the tests create (and drop) databases of their own from it
PG_ADMIN = os.environ.get("SUMFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("SUMFLEET_TEST_REDIS", "redis://127.0.0.1:6379")
SAMPLE = ROOT / "examples" / "sample.jsonl"


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own on the real PostgreSQL, dropped at the end."""
    name = f"sumfleet_test_{secrets.token_hex(4)}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with _pg_admin() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def own_database(pg_url: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own (nothing else in the run sees or changes it)."""
    name = f"sumfleet_test_{secrets.token_hex(4)}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{pg_url.rsplit('/', 1)[0]}/{name}"
    with _pg_admin() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


RESERVATION_KEY = "sumfleet:test-reservation"  # set in a Redis db by the test run that uses it


@dataclass
class RedisReservation:
    """A Redis db this test run reserved while it was empty: the only db it may flush."""

    url: str
    token: str

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def flush(self) -> None:
        """Empty the reserved db (what a Redis restart without persistence does), keeping it reserved."""
        client = self.client()
        if client.get(RESERVATION_KEY) != self.token.encode():
            raise AssertionError(f"{self.url} is no longer reserved by this test run: not flushing it")
        client.flushdb()
        client.set(RESERVATION_KEY, self.token)
        client.close()


def _reserve_redis_db() -> RedisReservation:
    """The first empty db (1-13; bench/ uses 14) that this run can mark as its own.

    A db is taken only if setting the reservation key succeeds (no other run holds it) and the
    key is then the db's only key (nobody else's data is there). SUMFLEET_TEST_REDIS_DB pins
    the db number; it must be empty too.
    """
    import redis

    pinned = os.environ.get("SUMFLEET_TEST_REDIS_DB")
    numbers = [int(pinned)] if pinned else list(range(1, 14))
    token = secrets.token_hex(8)
    for number in numbers:
        client = redis.Redis.from_url(f"{REDIS}/{number}", socket_timeout=5)
        try:
            if client.set(RESERVATION_KEY, token, nx=True):
                if client.dbsize() == 1:
                    return RedisReservation(f"{REDIS}/{number}", token)
                client.delete(RESERVATION_KEY)  # the db holds someone's data: leave it as it was
        finally:
            client.close()
    raise AssertionError(
        f"no empty Redis db among {numbers} at {REDIS}: each holds data or another test run's reservation"
        " (set SUMFLEET_TEST_REDIS_DB to an empty db)"
    )


@pytest.fixture(scope="session")
def redis_reservation() -> Iterator[RedisReservation]:
    """A Redis db of this run's own, emptied when the run ends (and only if still reserved by it)."""
    reservation = _reserve_redis_db()
    yield reservation
    client = reservation.client()
    if client.get(RESERVATION_KEY) == reservation.token.encode():
        client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def redis_url(redis_reservation: RedisReservation) -> str:
    """The URL of this run's own Redis db (see `redis_reservation`)."""
    return redis_reservation.url


@pytest.fixture
def fleet_settings(pg_url: str, redis_url: str) -> Settings:
    """Settings on the real services, with a queue of the test's own (no stray messages)."""
    return Settings(
        database_url=pg_url,
        broker_url=redis_url,
        queue=f"sumfleet.test-{secrets.token_hex(4)}",
        chunk_size=4,
    )


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}", chunk_size=4)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment a subprocess needs to see `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMFLEET_")}
    for field, value in settings.model_dump().items():
        if value is not None:
            env[f"SUMFLEET_{field.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sumfleet(
    *args: str,
    settings: Settings | None = None,
    input: bytes | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real `sumfleet` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=settings_env(settings) if settings else {**os.environ, "PYTHONUNBUFFERED": "1"},
        input=input,
        capture_output=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


class CliProcess:
    """A real long-running `sumfleet COMMAND` subprocess (its own process group), its log in a file."""

    def __init__(self, args: list[str], settings: Settings, log: Path, mode: str = "wb") -> None:
        self.log = log
        self.handle = log.open(mode)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", *args],
            env=settings_env(settings),
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to the whole group (a worker's children too), SIGKILL after 30 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.handle.close()


class WorkerProcess(CliProcess):
    """A real `sumfleet worker` subprocess with its log in a file."""

    def __init__(self, settings: Settings, model: str, log: Path, extra: tuple[str, ...] = ()) -> None:
        super().__init__(["worker", "--model", model, "--loglevel", "INFO", *extra], settings, log)

    def wait_ready(self, timeout: float = 300) -> None:
        """Until the child process has loaded its model (it logs `ready with model`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready with model" in self.text():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.text()}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.text()}")


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker subprocesses; all are stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, model: str = "lead", *extra: str) -> WorkerProcess:
        worker = WorkerProcess(settings, model, tmp_path / f"worker-{len(started)}.log", extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run_sample_through_a_worker(
    settings: Settings, start_worker: Callable[..., WorkerProcess], ready_timeout: float = 300
) -> tuple[list[dict[str, Any]], WorkerProcess]:
    """The sample corpus through one real `sumfleet worker` of the default model (its engine as
    `settings` say) over Redis and PostgreSQL: the 8 rows once all succeeded and the counters agree."""
    from producer.client import Client

    client = Client(settings)
    client.ensure_schema()
    worker = start_worker(settings, "smollm2")
    worker.wait_ready(ready_timeout)
    submission = client.submit_file(str(SAMPLE), model="smollm2")
    status = wait_for(lambda: (s := client.status(submission.batch_id)).done and s, 300, "the batch", poll=0.5)
    assert status.counts == {"succeeded": 8}, worker.text()[-3000:]
    assert client.verify(submission.batch_id) == []
    rows = list(client.results(submission.batch_id))
    limit = settings.max_new_tokens
    assert all(r["summary"] and 0 < r["output_tokens"] <= limit and r["prompt_variant"] == "en" for r in rows), rows
    return rows, worker


def transformers_engine(name: str, settings: Settings) -> Any:
    """The generation pipeline of a transformers model, typed loosely: tests reach into its backend.
    The engine is named: `auto` sends the bundled GGUF to llama.cpp on CPUs without fast bf16."""
    from worker.backends.hf import TransformersBackend
    from worker.loading import load_engine
    from worker.pipeline import GenerationPipeline

    engine = load_engine(name, settings.model_copy(update={"engine": "transformers"}))
    assert isinstance(engine, GenerationPipeline) and isinstance(engine.backend, TransformersBackend)
    return engine


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB. Not ru_maxrss: that one keeps the peak of
    the process image before exec, so a child of a big test process would report its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def wait_for(condition: Callable[[], T | Literal[False] | None], timeout: float, what: str, poll: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
