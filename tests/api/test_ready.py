"""Liveness and readiness of the API, and its logs: `/health` answers while the process lives,
`/ready` answers 503 naming the database or the broker when one is unreachable, and the API's
own INFO lines appear (as JSON lines with `--log-format json`)."""

from __future__ import annotations

import json

import httpx
import pytest

from models.settings import Settings
from tests.api.conftest import new_key
from tests.conftest import wait_for
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.services


def test_ready_names_what_is_unreachable_and_health_stays_up(api_settings: Settings, start_api) -> None:
    database, broker = Proxy(("127.0.0.1", 5432)), Proxy(("127.0.0.1", 6379))
    database.start()
    broker.start()
    settings = api_settings.model_copy(
        update={
            "database_url": api_settings.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{database.port}"),
            "broker_url": api_settings.broker_url.replace("127.0.0.1:6379", f"127.0.0.1:{broker.port}"),
        }
    )
    api = start_api(settings).wait_ready()
    try:
        ready = httpx.get(f"{api.url}/ready", timeout=30)
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}

        broker.cut()
        refused = httpx.get(f"{api.url}/ready", timeout=30)
        assert refused.status_code == 503, refused.text
        message = refused.json()["error"]["message"]
        assert message.startswith("not ready: broker unreachable: cannot reach the broker at redis://")
        assert "database" not in message
        assert httpx.get(f"{api.url}/health", timeout=10).json() == {"status": "ok"}  # alive all the same

        broker.start()
        database.cut()
        refused = wait_for(
            lambda: (r := httpx.get(f"{api.url}/ready", timeout=30)).status_code == 503 and r, 60, "a 503"
        )
        message = refused.json()["error"]["message"]
        assert message.startswith("not ready: database unreachable (postgresql+psycopg://") and "broker" not in message
        database.start()
        wait_for(lambda: httpx.get(f"{api.url}/ready", timeout=30).status_code == 200, 60, "ready again")
    finally:
        database.cut()
        broker.cut()


def test_json_logs_carry_the_apis_own_info_lines(api_settings: Settings, start_api, start_worker, receivers) -> None:
    receiver = receivers()
    api = start_api(api_settings, None, "--log-format", "json").wait_ready()
    start_worker(api_settings, "lead")
    key = new_key(api_settings, "logs")
    created = httpx.post(
        f"{api.url}/api/v1/batches",
        headers=key.headers,
        json={"documents": ["One. Two."], "model": "lead", "callback_url": f"{receiver.url}/done"},
    )
    assert created.status_code == 201, created.text
    wait_for(lambda: receiver.received, 120, "the completion webhook")

    def delivered() -> dict | None:
        lines = [json.loads(line) for line in api.text().splitlines() if line.startswith("{")]
        return next((x for x in lines if x["logger"] == "producer.api.webhooks" and "delivered" in x["message"]), None)

    line = wait_for(delivered, 30, "the delivery's log line")
    assert line["level"] == "info" and line["delivery_id"].startswith("whd_")
    lines = [json.loads(x) for x in api.text().splitlines() if x.startswith("{")]
    assert any(x["logger"] == "uvicorn.access" for x in lines)  # uvicorn's lines in the same format
    assert all({"time", "level", "logger", "message"} <= set(x) for x in lines)
