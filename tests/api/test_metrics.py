"""`/metrics` of the API: the fleet's backlog in documents, jobs by state and queue messages,
read from the batches' counters and the broker, equal to the database's own counts."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.settings import Settings
from producer.client import Client
from tests.api.conftest import jsonl, new_key, request_line
from tests.conftest import wait_for

pytestmark = pytest.mark.services


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_api_metrics_follow_the_backlog_to_zero(
    own_database: str, redis_url: str, api_settings: Settings, start_api, start_worker
) -> None:
    settings = api_settings.model_copy(update={"database_url": own_database, "chunk_size": 3})
    api = start_api(settings).wait_ready()
    client = Client(settings)
    first = client.submit([f"Document {i}. It says things." for i in range(10)], model="lead")
    second = client.submit(["One more. Fine."], model="lead")
    queue = str(settings.queue)

    samples = scrape(api.url)  # no key needed, like /health
    assert samples[("sumfleet_queue_documents", (("model", "lead"),))] == 11
    assert samples[("sumfleet_jobs", (("model", "lead"), ("state", "queued")))] == 11
    assert samples[("sumfleet_jobs", (("model", "lead"), ("state", "succeeded")))] == 0
    assert samples[("sumfleet_unfinished_batches", (("model", "lead"),))] == 2
    assert samples[("sumfleet_queue_messages", (("queue", queue),))] == first.chunks + second.chunks == 5
    assert samples[("sumfleet_webhook_deliveries", (("state", "pending"),))] == 0

    start_worker(settings, "lead")
    wait_for(lambda: client.status(first.batch_id).done and client.status(second.batch_id).done, 120, "both batches")
    samples = scrape(api.url)
    assert ("sumfleet_queue_documents", (("model", "lead"),)) not in samples  # no unfinished batch left
    assert not any(name == "sumfleet_queue_messages" for name, _ in samples)
    assert "process_resident_memory_bytes" in {name for name, _ in samples}


def test_batch_objects_warn_while_no_live_worker_serves_the_model(
    own_database: str, api_settings: Settings, start_api, start_worker
) -> None:
    settings = api_settings.model_copy(update={"database_url": own_database, "queue": "sumfleet.unserved-test"})
    api = start_api(settings).wait_ready()
    key = new_key(settings, "warned")
    queue = "sumfleet.unserved-test"
    warning = (
        f"no live worker serves model lead (queue {queue}); start one: sumfleet worker --model lead --queue {queue}"
    )
    with httpx.Client(base_url=api.url, headers=key.headers, timeout=30) as http:
        native = http.post("/api/v1/batches", json={"documents": ["One. Two."], "model": "lead"}).json()
        assert native["warning"] == warning
        uploaded = http.post(
            "/v1/files", files={"file": ("r.jsonl", jsonl([request_line("a", "One. Two.")]))}, data={"purpose": "batch"}
        ).json()
        created = http.post(
            "/v1/batches",
            json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()
        running = wait_for(
            lambda: (b := http.get(f"/v1/batches/{created['id']}").json())["status"] == "in_progress" and b,
            60,
            "the OpenAI batch to be submitted",
        )
        assert running["warning"] == warning

        start_worker(settings, "lead").wait_ready(120)
        done = wait_for(
            lambda: (b := http.get(f"/v1/batches/{created['id']}").json())["status"] == "completed" and b, 120, "done"
        )
        assert done["warning"] is None
