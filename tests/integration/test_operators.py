"""What operators see of a real fleet: a worker's /metrics equal to the database's counts, the
worker registry, the warning for a model nobody serves, and Celery's own `inspect ping`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.settings import Settings
from producer.client import Client
from tests.conftest import ROOT, settings_env, sumfleet, wait_for

pytestmark = pytest.mark.services

TROUBLED = "python:tests.worker.toy_backend:troubled"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_worker_metrics_registry_warning_and_inspect_ping(fleet_settings: Settings, start_worker) -> None:
    settings = fleet_settings.model_copy(update={"model": TROUBLED, "chunk_size": 5})
    client = Client(settings)
    documents = ["This one runs OOM with company."]  # first: in a call with others, which runs out of memory
    documents += [f"Document {i} says one thing. Then another thing." for i in range(8)]
    documents += ["This one will FAIL to summarize."]
    lines = "\n".join(json.dumps({"text": d}) for d in documents).encode()
    submitted = sumfleet("submit", "-", settings=settings, input=lines)
    assert submitted.returncode == 0, submitted.stderr.decode()
    batch = submitted.stdout.decode().strip()
    warning = f"no live worker serves model {TROUBLED} (queue {settings.queue}); start one: sumfleet worker"
    assert warning in submitted.stderr.decode()  # said at submit
    assert warning in sumfleet("status", batch, settings=settings).stdout.decode()  # and by status

    port = free_port()
    worker = start_worker(settings, TROUBLED, "--metrics-port", str(port), "-E")
    worker.wait_ready(120)
    status = wait_for(lambda: (s := client.status(batch)).done and s, 120, "the batch to end")
    assert status.counts == {"succeeded": 9, "failed": 1} and status.warning is None

    url = f"http://127.0.0.1:{port}/metrics"
    model = (("model", TROUBLED),)

    def settled() -> dict | None:
        found = samples(url)
        done = found.get(("sumfleet_documents_total", (*model, ("status", "succeeded"))))
        return found if done == 9 else None

    found = wait_for(settled, 30, "the worker's counters")
    assert found[("sumfleet_documents_total", (*model, ("status", "failed")))] == 1  # equal to the database's counts
    assert found[("sumfleet_generate_seconds_count", model)] >= 2  # one call per generation batch, and the splits
    assert found[("sumfleet_generate_batch_size_count", model)] == found[("sumfleet_generate_seconds_count", model)]
    assert found[("sumfleet_oom_splits_total", model)] >= 1
    assert found[("sumfleet_live_workers", model)] == 1  # from the worker registry
    rows = list(client.results(batch))
    assert found[("sumfleet_output_tokens_total", model)] == sum(r["output_tokens"] or 0 for r in rows) > 0
    assert found[("sumfleet_prompt_tokens_total", model)] == sum(r["prompt_tokens"] or 0 for r in rows if r["summary"])
    assert found[("sumfleet_model_load_seconds", model)] >= 0
    assert found.get(("sumfleet_documents_in_flight", model), 0) == 0
    assert found.get(("sumfleet_queue_documents", model), 0) == 0  # its backlog went to 0 (the database is shared)

    listed = [
        json.loads(line) for line in sumfleet("workers", "--json", settings=settings).stdout.decode().splitlines()
    ]
    mine = [w for w in listed if w["model"] == TROUBLED and w["state"] == "live"]
    assert len(mine) == 1 and mine[0]["queue"] == settings.queue
    wait_for(
        lambda: any(
            w["documents"] == 10
            for w in map(json.loads, sumfleet("workers", "--json", settings=settings).stdout.decode().splitlines())
        ),
        30,
        "the heartbeat to carry the documents done",
    )

    host = socket.gethostname()
    node = f"sumfleet.python-tests.worker.toy_backend-troubled@{host}"
    ping = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "models.celery_app", "inspect", "ping", "-d", node, "--timeout", "10"],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert ping.returncode == 0, ping.stdout.decode() + ping.stderr.decode()
    assert "pong" in ping.stdout.decode() and node in ping.stdout.decode()


def test_worker_json_logs_carry_batch_worker_and_model(fleet_settings: Settings, start_worker) -> None:
    settings = fleet_settings.model_copy(update={"model": "lead"})
    worker = start_worker(settings, "lead", "--log-format", "json")
    worker.wait_ready(120)
    batch = Client(settings).submit(["One. Two. Three. Four."], model="lead").batch_id

    def ran() -> dict | None:
        lines = [json.loads(x) for x in worker.text().splitlines() if x.startswith("{")]
        return next((x for x in lines if x.get("batch_id") == batch and "ran 1" in x["message"]), None)

    line = wait_for(ran, 60, "the batch's log line")
    assert line["model"] == "lead" and line["worker"].split(":")[-1].isdigit()  # host:pid
    assert line["level"] == "info" and line["logger"] == "worker.app"
    lines = [json.loads(x) for x in worker.text().splitlines() if x.startswith("{")]
    assert any(x["logger"].startswith("celery") for x in lines)  # Celery's own lines in the same format
