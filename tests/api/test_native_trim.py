"""The native API's `trim` option and the result rows' `finish_reason` and `warnings`, against a real
`sumfleet api` and a real `lead` worker."""

from __future__ import annotations

import json

import httpx
import pytest

from models.settings import Settings
from models.store import get_batch
from producer.client import Client
from tests.conftest import wait_for

pytestmark = pytest.mark.services


def _params(settings: Settings, batch_id: str) -> dict:
    client = Client(settings, migrate=False)
    try:
        with client.sessions() as session:
            return dict(get_batch(session, batch_id).params)
    finally:
        client.close()


def test_trim_is_a_batch_option_and_results_carry_the_new_fields(
    http: httpx.Client, api_settings: Settings, start_worker
) -> None:
    start_worker(api_settings, "lead")
    created = http.post(
        "/api/v1/batches", json={"documents": ["One. Two.", "no no no no no no."], "model": "lead", "trim": "none"}
    )
    assert created.status_code == 201, created.text
    batch_id = created.json()["id"]
    assert _params(api_settings, batch_id)["trim"] == "none"
    default = http.post("/api/v1/batches", json={"documents": ["One. Two."], "model": "lead"}).json()["id"]
    assert _params(api_settings, default)["trim"] == "sentence"
    uploaded = http.post(
        "/api/v1/batches/upload",
        files={"file": ("d.jsonl", b'{"id": "a", "text": "One. Two."}\n')},
        data={"model": "lead", "trim": "none"},
    )
    assert uploaded.status_code == 201, uploaded.text
    assert _params(api_settings, uploaded.json()["id"])["trim"] == "none"

    bad = http.post("/api/v1/batches", json={"documents": ["One."], "trim": "words"})
    assert bad.status_code == 422 and "trim" in bad.text
    bad_form = http.post(
        "/api/v1/batches/upload", files={"file": ("d.jsonl", b'{"text": "One."}\n')}, data={"trim": "words"}
    )
    assert bad_form.status_code == 422 and "trim" in bad_form.text

    def ended() -> bool:
        return http.get(f"/api/v1/batches/{batch_id}").json()["state"] == "completed"

    wait_for(ended, 120, "the batch to end")
    rows = [json.loads(line) for line in http.get(f"/api/v1/batches/{batch_id}/results").text.splitlines()]
    assert [(r["finish_reason"], r["warnings"]) for r in rows] == [("stop", []), ("stop", ["repetition"])]
