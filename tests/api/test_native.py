"""The native endpoints under /api/v1 against a real `sumfleet api` and a real `lead` worker."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from models.settings import Settings
from models.text import lead
from tests.api.conftest import ApiServer, new_key
from tests.conftest import SAMPLE, wait_for

pytestmark = pytest.mark.services


def _done(http: httpx.Client, batch_id: str, timeout: float = 120) -> dict:
    def ended() -> dict | None:
        batch = http.get(f"/api/v1/batches/{batch_id}").json()
        return batch if batch["state"] in ("completed", "cancelled") else None

    return wait_for(ended, timeout, f"batch {batch_id} to end")


def test_inline_create_get_and_stream_results(http: httpx.Client, api_settings: Settings, start_worker) -> None:
    start_worker(api_settings, "lead")
    documents: list[Any] = [
        "Plain string one. It has sentences. Three of them. And a fourth.",
        {"id": "obj-2", "text": "Object two. With an id.", "category": "news"},
        {"id": 3, "document": "Third uses the document key. Fine."},
    ]
    created = http.post(
        "/api/v1/batches", json={"documents": documents, "model": "lead", "prompt": "headline", "max_new_tokens": 16}
    )
    assert created.status_code == 201, created.text
    batch = created.json()
    assert batch["object"] == "summary_batch" and batch["id"].startswith("b")
    assert (batch["accepted"], batch["skipped"], batch["total"]) == (3, [], 3)
    assert (batch["model"], batch["prompt"], batch["source"]) == ("lead", "headline", "<api>")
    assert batch["results_url"] == f"/api/v1/batches/{batch['id']}/results"

    done = _done(http, batch["id"])
    assert done["state"] == "completed" and done["counts"] == {"succeeded": 3}
    assert done["docs_per_second"] > 0 and done["started_at"] and done["finished_at"]

    with http.stream("GET", done["results_url"]) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        assert "content-length" not in response.headers  # streamed, not built in memory
        rows = [json.loads(line) for line in response.iter_lines() if line]
    assert [r["id"] for r in rows] == ["1", "obj-2", "3"]
    assert [r["summary"] for r in rows] == [
        lead(documents[0], 3),
        "Object two. With an id.",
        "Third uses the document key. Fine.",
    ]
    assert all(r["status"] == "succeeded" and r["error"] is None and r["worker"] for r in rows)


def test_upload_create_with_bad_rows_skipped(http: httpx.Client, api_settings: Settings, start_worker) -> None:
    start_worker(api_settings, "lead")
    corpus = SAMPLE.read_bytes() + b'{"id": "broken", "text": ""}\n'
    created = http.post(
        "/api/v1/batches/upload",
        files={"file": ("sample.jsonl", corpus, "application/x-ndjson")},
        data={"model": "lead", "skip_bad_rows": "true", "max_words": "20", "language": "en"},
    )
    assert created.status_code == 201, created.text
    batch = created.json()
    assert batch["accepted"] == 8 and batch["source"] == "sample.jsonl"
    assert batch["skipped"] == ['line 9: field "text" is empty']
    done = _done(http, batch["id"])
    assert done["counts"] == {"succeeded": 8}
    rows = [json.loads(line) for line in http.get(done["results_url"]).text.splitlines()]
    sources = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in sources]
    assert [r["summary"] for r in rows] == [lead(s["text"], 3) for s in sources]

    csv_made = http.post(
        "/api/v1/batches/upload", files={"file": ("t.csv", b"id,text\na,One. Two.\nb,Three.\n")}, data={"model": "lead"}
    )
    assert csv_made.status_code == 201 and csv_made.json()["accepted"] == 2
    assert _done(http, csv_made.json()["id"])["counts"] == {"succeeded": 2}


def test_list_pages_newest_first_and_only_this_keys(http: httpx.Client, api: ApiServer, api_settings: Settings) -> None:
    made = [
        http.post("/api/v1/batches", json={"documents": [f"Doc {i}. Text."], "model": "lead"}).json()["id"]
        for i in range(3)
    ]
    other = new_key(api_settings, "tenant-b")
    httpx.post(f"{api.url}/api/v1/batches", headers=other.headers, json={"documents": ["Not mine."], "model": "lead"})
    first = http.get("/api/v1/batches", params={"limit": 2}).json()
    assert first["object"] == "list" and [b["id"] for b in first["data"]] == made[::-1][:2]
    assert (first["first_id"], first["last_id"], first["has_more"]) == (made[2], made[1], True)
    rest = http.get("/api/v1/batches", params={"limit": 2, "after": first["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [made[0]] and rest["has_more"] is False
    assert http.get("/api/v1/batches", params={"limit": 0}).status_code == 422
    for batch_id in made:
        http.post(f"/api/v1/batches/{batch_id}/cancel")


def test_cancel(http: httpx.Client) -> None:
    batch = http.post("/api/v1/batches", json={"documents": ["One. Two.", "Three. Four."], "model": "lead"}).json()
    cancelled = http.post(f"/api/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["counts"] == {"cancelled": 2}
    again = http.post(f"/api/v1/batches/{batch['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"] == {
        "message": f"batch {batch['id']} has already ended (cancelled); nothing to cancel",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_state",
    }
    rows = [json.loads(line) for line in http.get(f"/api/v1/batches/{batch['id']}/results").text.splitlines()]
    assert [r["status"] for r in rows] == ["cancelled", "cancelled"]


def test_any_detected_language_may_be_fixed_and_an_unknown_one_is_refused(http: httpx.Client) -> None:
    made = http.post(
        "/api/v1/batches", json={"documents": ["Une phrase. Une autre."], "model": "lead", "language": "fr"}
    )
    assert made.status_code == 201, made.text  # was 422: the schema knew only en, zh, ja, ko
    http.post(f"/api/v1/batches/{made.json()['id']}/cancel")
    refused = http.post("/api/v1/batches", json={"documents": ["One. Two."], "model": "lead", "language": "xx"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["message"].startswith("unknown language 'xx': use auto or an ISO 639-1 code")
