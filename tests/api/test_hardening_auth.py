"""Authentication comes before the body: a request without a valid key gets its 401 without the
API reading (or waiting for) the body, so big unauthenticated uploads cost the API nothing.

The requests are written on a raw socket: the headers announce a 50 MiB body and the client sends
none of it (or only the first MiB), then reads the answer. An API that read the body before
checking the key would wait for the rest and never answer.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from models.settings import Settings
from tests.api.conftest import ApiServer, Key, new_key

pytestmark = pytest.mark.services

BIG = 50 * 1024 * 1024
WAIT = 60  # seconds to wait for an answer: only a bound, never compared with anything


@pytest.fixture(scope="module")
def roomy(api_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """An API whose upload limit (256 MiB) is far above the bodies sent, so only auth can refuse them."""
    settings = api_settings.model_copy(update={"api_max_upload_bytes": 256 * 1024 * 1024})
    server = ApiServer(settings, tmp_path_factory.mktemp("roomy") / "api.log").wait_ready()
    yield server
    server.stop()


def _exchange(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send `head` (and `body`, if any) on a fresh connection; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(head.encode("latin-1") + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            assert chunk, f"the API closed the connection without an answer: {received!r}"
            received += chunk
        top, _, rest = received.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = connection.recv(65536)
            assert chunk, "the answer was cut short"
            rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _head(method: str, path: str, port: int, content_type: str, authorization: str | None, chunked: bool) -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return "\r\n".join(lines) + "\r\n\r\n"


ROUTES = [
    ("POST", "/v1/files", "multipart/form-data; boundary=sumfleet"),
    ("POST", "/v1/batches", "application/json"),
    ("POST", "/api/v1/batches", "application/json"),
    ("POST", "/api/v1/batches/upload", "multipart/form-data; boundary=sumfleet"),
    ("POST", "/v1/batches/batch_x/cancel", "application/json"),
    ("DELETE", "/v1/files/file-x", "application/octet-stream"),
]
KEYS = [
    (None, "missing_api_key", "no API key: send it as `Authorization: Bearer <key>`"),
    ("Basic dXNlcjpwYXNz", "missing_api_key", "the Authorization header must be `Bearer <key>`"),
    ("Bearer sk-sumfleet-not-a-key", "invalid_api_key", "invalid API key: no such key"),
]


@pytest.mark.parametrize(("authorization", "code", "message"), KEYS, ids=["no-key", "basic", "unknown-key"])
@pytest.mark.parametrize(("method", "path", "content_type"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_401_comes_before_the_body(
    roomy: ApiServer, method: str, path: str, content_type: str, authorization: str | None, code: str, message: str
) -> None:
    head = _head(method, path, roomy.port, content_type, authorization, chunked=False)
    status, headers, body = _exchange(roomy.port, head)  # not one byte of the 50 MiB sent
    assert status == 401, body
    assert headers["www-authenticate"] == "Bearer"
    error = httpx.Response(status, content=body).json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("authentication_error", code, None)
    assert error["message"].startswith(message)


def test_401_comes_before_a_chunked_body_and_after_a_part_of_one(roomy: ApiServer) -> None:
    chunked = _head("POST", "/v1/files", roomy.port, "multipart/form-data; boundary=x", None, chunked=True)
    status, _, body = _exchange(roomy.port, chunked, b"100000\r\n" + b"x" * 0x100000 + b"\r\n")  # 1 MiB, no end
    assert status == 401 and b'"missing_api_key"' in body
    declared = _head("POST", "/api/v1/batches", roomy.port, "application/json", "Bearer nope", chunked=False)
    status, _, body = _exchange(roomy.port, declared, b'{"documents": ["' + b"x" * (1024 * 1024))
    assert status == 401 and b'"invalid_api_key"' in body


def test_a_revoked_key_is_refused_before_the_body(roomy: ApiServer, api_settings: Settings) -> None:
    from sqlalchemy import update

    from models.db import open_database, session_factory
    from models.store import utcnow
    from models.tables import ApiKey

    key = new_key(api_settings, "revoked")
    engine = open_database(api_settings.database_url)
    with session_factory(engine).begin() as session:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(revoked_at=utcnow()))
    engine.dispose()
    head = _head("POST", "/v1/files", roomy.port, "multipart/form-data; boundary=x", f"Bearer {key.secret}", False)
    status, _, body = _exchange(roomy.port, head)
    assert status == 401
    assert httpx.Response(401, content=body).json()["error"]["code"] == "revoked_api_key"


def test_open_endpoints_and_valid_keys_still_work(roomy: ApiServer, api_settings: Settings) -> None:
    for path in ("/health", "/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{roomy.url}{path}", timeout=30).status_code == 200, path
    assert httpx.post(f"{roomy.url}/health", timeout=30).status_code == 401  # only reading is open
    key: Key = new_key(api_settings, "roomy")
    with httpx.Client(base_url=roomy.url, headers=key.headers, timeout=60) as http:
        lines = b"".join(
            b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "lead", '
            b'"messages": [{"role": "user", "content": "%s"}]}}\n' % (i, b"y" * 1000)
            for i in range(2000)
        )  # 2 MiB: the body of an authenticated request is read as before
        uploaded = http.post("/v1/files", files={"file": ("big.jsonl", lines)}, data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["bytes"] == len(lines)
        assert http.get(f"/v1/files/{uploaded.json()['id']}").json()["bytes"] == len(lines)
        unknown = http.get("/v1/nothing-here")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
