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
from pathlib import Path

import pytest

from models.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("SUMFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("SUMFLEET_TEST_REDIS", "redis://127.0.0.1:6379")
SAMPLE = ROOT / "examples" / "sample.jsonl"


def _pg_admin():  # type: ignore[no-untyped-def]
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
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis db number of its own (1-13; bench/ uses 14), flushed before and after."""
    import redis

    pinned = os.environ.get("SUMFLEET_TEST_REDIS_DB")  # two test runs at once: give each its own
    number = int(pinned) if pinned else 1 + secrets.randbelow(13)
    url = f"{REDIS}/{number}"
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


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


def sumfleet(*args: str, settings: Settings | None = None, input: bytes | None = None,
             timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
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


def wait_for(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
