"""Fixtures of the HTTP API tests: a real `sumfleet api` process per module, API keys, a webhook receiver.

The API runs as a subprocess on a free port over the session's PostgreSQL database and Redis
db, with a queue of the module's own; workers started with `start_worker(api_settings, ...)`
consume that queue.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import create_key
from models.db import open_database, session_factory
from models.settings import Settings
from tests.conftest import CliProcess

GATED = "python:tests.api.gated_engine:make"  # the lead engine, except FAIL and WAIT:<path> requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ApiServer(CliProcess):
    """A real `sumfleet api` subprocess with its log in a file."""

    def __init__(self, settings: Settings, log: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["api", "--port", str(self.port), "--log-level", "info", *extra], settings, log, mode="ab")

    def wait_ready(self, timeout: float = 60) -> ApiServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"sumfleet api exited with {self.process.returncode}:\n{self.text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"sumfleet api not ready after {timeout}s:\n{self.text()}")


@pytest.fixture(scope="module")
def api_settings(pg_url: str, redis_url: str) -> Settings:
    """Settings of the module's API: fast background passes, small limits, the test models."""
    return Settings(
        database_url=pg_url,
        broker_url=redis_url,
        queue=f"sumfleet.api-test-{secrets.token_hex(4)}",
        chunk_size=4,
        api_poll_interval=0.2,
        api_webhook_backoff=0.3,
        api_max_upload_bytes=64 * 1024,
        api_max_documents=50,
        api_models=f"lead,smollm2,{GATED}",
        api_webhook_private=True,  # the test receivers listen on 127.0.0.1
    )


@pytest.fixture(scope="module")
def api(api_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(api_settings, tmp_path_factory.mktemp("api") / "api.log").wait_ready()
    yield server
    server.stop()


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """Start more API processes in a test; all are stopped at its end."""
    started: list[ApiServer] = []

    def start(settings: Settings, port: int | None = None, *extra: str) -> ApiServer:
        server = ApiServer(settings, tmp_path / f"api-{len(started)}.log", port, extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass(frozen=True)
class Key:
    id: str
    secret: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def new_key(settings: Settings, name: str = "test") -> Key:
    """A fresh key, written straight to the database (the CLI path has its own test)."""
    engine = open_database(settings.database_url)
    try:
        with session_factory(engine).begin() as session:
            made = create_key(session, name)
    finally:
        engine.dispose()
    return Key(made.id, made.secret, made.webhook_secret)


@pytest.fixture
def key(api: ApiServer, api_settings: Settings) -> Key:
    return new_key(api_settings, "tenant-a")


@pytest.fixture
def sdk(api: ApiServer, key: Key) -> openai.OpenAI:
    """The official OpenAI SDK on the module's API, as `key`."""
    return openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def db(api: ApiServer, api_settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the module's database (its schema made by the module's API)."""
    engine = open_database(api_settings.database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def http(api: ApiServer, key: Key) -> Iterator[httpx.Client]:
    """A plain HTTP client with `key`'s Authorization header."""
    with httpx.Client(base_url=api.url, headers=key.headers, timeout=30) as client:
        yield client


def request_line(custom_id: str, text: str, *, model: str = "lead", **body: Any) -> dict[str, Any]:
    """One line of an OpenAI batch input file asking to summarize `text`."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@dataclass
class Receiver:
    """A local webhook receiver: answers each POST with the next status of `script` (then 200)."""

    script: list[int] = field(default_factory=list)
    port: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.script.pop(0) if receiver.script else 200
                receiver.received.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                        "status": status,
                        "at": time.time(),
                    }
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*script: int, port: int = 0) -> Receiver:
        receiver = Receiver(list(script), port)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()
