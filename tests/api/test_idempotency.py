"""`Idempotency-Key` on the native create routes: a retried request returns the first batch."""

from __future__ import annotations

import httpx
import pytest

from models.settings import Settings
from tests.api.conftest import ApiServer, new_key

pytestmark = pytest.mark.services


def test_a_retry_with_the_same_key_returns_the_first_batch(
    http: httpx.Client, api: ApiServer, api_settings: Settings
) -> None:
    body = {"documents": ["First document. Two sentences."], "model": "lead"}
    first = http.post("/api/v1/batches", json=body, headers={"Idempotency-Key": "upload-7"})
    assert first.status_code == 201, first.text
    listed = len(http.get("/api/v1/batches", params={"limit": 100}).json()["data"])

    again = http.post(
        "/api/v1/batches", json={**body, "documents": ["Changed."]}, headers={"Idempotency-Key": "upload-7"}
    )
    assert again.status_code == 201, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["total"] == 1
    files = {"file": ("docs.jsonl", b'{"id": "a", "text": "Uploaded."}\n')}
    uploaded = http.post(
        "/api/v1/batches/upload", files=files, data={"model": "lead"}, headers={"Idempotency-Key": "upload-7"}
    )
    assert uploaded.status_code == 201 and uploaded.json()["id"] == first.json()["id"]
    assert len(http.get("/api/v1/batches", params={"limit": 100}).json()["data"]) == listed

    # another API key's identical header is its own: keys are scoped to the caller
    other = new_key(api_settings, "tenant-b")
    theirs = httpx.post(
        f"{api.url}/api/v1/batches", json=body, headers={**other.headers, "Idempotency-Key": "upload-7"}
    )
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    # without a key every request is a new batch
    plain = [http.post("/api/v1/batches", json=body).json()["id"] for _ in range(2)]
    assert len(set(plain)) == 2 and first.json()["id"] not in plain
