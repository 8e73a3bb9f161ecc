"""API keys: `sumfleet keys create|list|revoke`, 401 without a valid key, 404 for another key's objects."""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import pytest
from sqlalchemy import select

from models.db import open_database, session_factory
from models.settings import Settings
from models.tables import ApiKey
from tests.api.conftest import ApiServer, Key, jsonl, new_key, request_line
from tests.conftest import sumfleet

pytestmark = pytest.mark.services


def _cli_key(settings: Settings, name: str) -> dict[str, str]:
    made = sumfleet("keys", "create", "--name", name, "--json", settings=settings)
    assert made.returncode == 0, made.stderr.decode()
    return json.loads(made.stdout)


def test_keys_cli_stores_only_a_hash_and_revokes(api: ApiServer, api_settings: Settings) -> None:
    made = _cli_key(api_settings, "billing-app")
    assert made["id"].startswith("key_") and made["name"] == "billing-app"
    assert made["api_key"].startswith("sk-sumfleet-") and len(made["api_key"]) > 40
    assert made["webhook_secret"].startswith("whsec_")
    engine = open_database(api_settings.database_url)
    with session_factory(engine)() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == made["id"]))
    engine.dispose()
    assert row is not None and row.secret_hash == hashlib.sha256(made["api_key"].encode()).hexdigest()
    assert made["api_key"] not in (row.secret_prefix, row.secret_hash)

    listed = sumfleet("keys", "list", settings=api_settings).stdout.decode()
    line = next(line for line in listed.splitlines() if line.startswith(made["id"]))
    assert "active" in line and "billing-app" in line and made["api_key"] not in listed
    assert made["api_key"][:16] + "..." in line  # the prefix tells keys apart

    headers = {"Authorization": f"Bearer {made['api_key']}"}
    assert httpx.get(f"{api.url}/v1/batches", headers=headers).status_code == 200
    revoked = sumfleet("keys", "revoke", made["id"], settings=api_settings)
    assert revoked.returncode == 0 and f"revoked {made['id']}" in revoked.stderr.decode()
    refused = httpx.get(f"{api.url}/v1/batches", headers=headers)
    assert refused.status_code == 401
    assert refused.json() == {
        "error": {
            "message": f"API key {made['id']} has been revoked",
            "type": "authentication_error",
            "param": None,
            "code": "revoked_api_key",
        }
    }
    assert "revoked" in sumfleet("keys", "list", settings=api_settings).stdout.decode()
    unknown = sumfleet("keys", "revoke", "key_nope", settings=api_settings)
    assert unknown.returncode == 1
    assert unknown.stderr.decode().strip() == "sumfleet keys: error: no API key 'key_nope' (see `sumfleet keys list`)"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files/file-x/content"),
        ("DELETE", "/v1/files/file-x"),
        ("GET", "/v1/batches"),
        ("POST", "/v1/batches"),
        ("POST", "/v1/batches/batch_x/cancel"),
        ("GET", "/api/v1/batches"),
        ("POST", "/api/v1/batches"),
        ("GET", "/api/v1/batches/bx/results"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/lead"),
        ("POST", "/v1/no-such-endpoint"),  # refused before routing: no key, nothing to learn
    ],
)
def test_no_key_is_401(api: ApiServer, method: str, path: str) -> None:
    response = httpx.request(method, f"{api.url}{path}")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "missing_api_key"


def test_wrong_keys_are_401(api: ApiServer) -> None:
    basic = httpx.get(f"{api.url}/v1/batches", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401
    assert basic.json()["error"]["message"] == "the Authorization header must be `Bearer <key>`"
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(api_key="sk-sumfleet-not-a-key", base_url=f"{api.url}/v1", max_retries=0).batches.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert httpx.get(f"{api.url}/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{api.url}/openapi.json").status_code == 200


def test_another_keys_objects_answer_404(api: ApiServer, api_settings: Settings, key: Key) -> None:
    mine = openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0)
    uploaded = mine.files.create(file=("mine.jsonl", jsonl([request_line("a", "One. Two.")])), purpose="batch")
    batch = mine.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    native = httpx.post(
        f"{api.url}/api/v1/batches", headers=key.headers, json={"documents": ["Mine. Only."], "model": "lead"}
    ).json()

    other = new_key(api_settings, "tenant-b")
    theirs = openai.OpenAI(api_key=other.secret, base_url=f"{api.url}/v1", max_retries=0)
    for call in (
        lambda: theirs.files.retrieve(uploaded.id),
        lambda: theirs.files.content(uploaded.id),
        lambda: theirs.files.delete(uploaded.id),
        lambda: theirs.batches.retrieve(batch.id),
        lambda: theirs.batches.cancel(batch.id),
        lambda: theirs.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as hidden:
            call()
        assert hidden.value.body["code"] == "not_found"  # type: ignore[index]
    assert theirs.batches.list().data == [] and theirs.files.list().data == []
    with httpx.Client(base_url=api.url, headers=other.headers) as http:
        for method, path in (
            ("GET", f"/api/v1/batches/{native['id']}"),
            ("GET", f"/api/v1/batches/{native['id']}/results"),
            ("POST", f"/api/v1/batches/{native['id']}/cancel"),
            ("GET", f"/api/v1/batches/{batch.id}"),
        ):
            response = http.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["message"].endswith("for this API key")
        assert http.get("/api/v1/batches").json()["data"] == []
        assert http.get("/v1/batches", params={"after": batch.id}).status_code == 400  # not a cursor of theirs
        # the native and OpenAI spaces are apart too: an OpenAI batch id is no native batch
    assert httpx.get(f"{api.url}/api/v1/batches/{batch.id}", headers=key.headers).status_code == 404

    assert mine.batches.retrieve(batch.id).id == batch.id  # the owner still sees everything
    assert mine.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    assert httpx.get(f"{api.url}/api/v1/batches/{native['id']}", headers=key.headers).status_code == 200


def test_api_command_refuses_an_unreachable_database() -> None:
    dead = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none")
    refused = sumfleet("api", "--port", "1", settings=dead, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.decode().startswith(
        "sumfleet api: error: cannot reach database postgresql+psycopg://postgres@127.0.0.1:1/none"
    )
