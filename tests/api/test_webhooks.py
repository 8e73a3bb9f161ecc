"""Completion webhooks: signed the Standard Webhooks way (verified by the OpenAI SDK) and with the
Sumfleet-* headers (HMAC-SHA256 over "<timestamp>.<body>"), retried with backoff, delivered at
least once, resumed by a restarted API process."""

from __future__ import annotations

import base64
import json
import secrets
import time

import httpx
import openai
import pytest

from models.api_store import deliveries_for
from models.db import open_database, session_factory
from models.settings import Settings
from producer.api.webhooks import (
    InvalidSignature,
    headers_for,
    sign,
    sign_standard,
    standard_key,
    standard_secret,
    verify_signature,
)
from tests.api.conftest import GATED, ApiServer, Key, free_port, jsonl, new_key, request_line
from tests.conftest import wait_for

SECRET = "whsec_test"


# --- verify_signature, the receivers' helper ------------------------------------------------------


def test_verify_signature_accepts_a_fresh_genuine_delivery() -> None:
    body = b'{"id":"batch_1","status":"completed"}'
    now = int(time.time())
    verify_signature(SECRET, body, str(now), sign(SECRET, now, body))
    verify_signature(SECRET, body, str(now), f"v1=00ff, {sign(SECRET, now, body)}")  # one of several (secret rotation)


@pytest.mark.parametrize(
    ("body", "timestamp", "secret", "reason"),
    [
        (b'{"id":"batch_1","status":"failed"}', 0, SECRET, "signature does not match the body"),
        (b'{"id":"batch_1","status":"completed"}', 0, "whsec_other", "signature does not match the body"),
        (b'{"id":"batch_1","status":"completed"}', -301, SECRET, "the tolerance is 300s"),
        (b'{"id":"batch_1","status":"completed"}', 301, SECRET, "the tolerance is 300s"),
    ],
)
def test_verify_signature_refuses_tampered_wrong_or_stale(
    body: bytes, timestamp: int, secret: str, reason: str
) -> None:
    now = int(time.time())
    signed_at = now + timestamp
    signature = sign(SECRET, signed_at, b'{"id":"batch_1","status":"completed"}')
    with pytest.raises(InvalidSignature, match=reason):
        verify_signature(secret, body, str(signed_at), signature, now=now)


def test_verify_signature_refuses_missing_or_malformed_headers() -> None:
    with pytest.raises(InvalidSignature, match="missing"):
        verify_signature(SECRET, b"{}", None, "v1=ab")
    with pytest.raises(InvalidSignature, match="not a Unix time"):
        verify_signature(SECRET, b"{}", "yesterday", "v1=ab")
    now = int(time.time())
    with pytest.raises(InvalidSignature, match="does not match"):
        verify_signature(SECRET, b"{}", str(now), sign(SECRET, now, b"{}").removeprefix("v1="))


# --- Standard Webhooks ----------------------------------------------------------------------------


def test_standard_signature_matches_the_specs_example() -> None:
    """The example of the Standard Webhooks reference libraries (secret, id, timestamp, body)."""
    secret, message_id, timestamp = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330
    signature = sign_standard(secret, message_id, timestamp, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_" + base64.b64encode(b"\xfb\xff" * 16).decode(),  # standard base64 with + / and =
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode().rstrip("="),  # how keys were made: - _
        "whsec_" + secrets.token_urlsafe(32),
    ],
    ids=["base64", "urlsafe", "random"],  # the same test ids in every process of a parallel run
)
def test_openai_sdk_verifies_the_standard_headers(secret: str) -> None:
    body = b'{"id":"batch_1","object":"batch","status":"completed"}'
    headers = headers_for(secret, body, "batch.completed", "whd_1")
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == ("whd_1", headers["Sumfleet-Timestamp"])
    assert standard_secret(standard_secret(secret)) == standard_secret(secret)
    assert base64.b64decode(standard_secret(secret)[6:]) == standard_key(secret)
    sdk = openai.OpenAI(api_key="x")
    sdk.webhooks.verify_signature(body, headers, secret=standard_secret(secret))
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body.replace(b"completed", b"failed"), headers, secret=standard_secret(secret))


# --- deliveries from a real API process -----------------------------------------------------------


def _check_signed(delivery: dict, key: Key) -> dict:
    headers = {k.lower(): v for k, v in delivery["headers"].items()}
    # Standard Webhooks: what OpenAI's SDK (and any Standard Webhooks library) verifies
    assert headers["webhook-id"] == headers["sumfleet-delivery"]
    assert headers["webhook-timestamp"] == headers["sumfleet-timestamp"]
    sdk = openai.OpenAI(api_key="x")
    event = sdk.webhooks.unwrap(delivery["body"], headers, secret=standard_secret(key.webhook_secret))
    assert event.id == json.loads(delivery["body"])["id"]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(delivery["body"], headers, secret=standard_secret("whsec_" + secrets.token_urlsafe(32)))
    verify_signature(
        key.webhook_secret,
        delivery["body"],
        headers["sumfleet-timestamp"],
        headers["sumfleet-signature"],
        now=delivery["at"],
    )
    with pytest.raises(InvalidSignature):
        verify_signature(
            "whsec_someone-else",
            delivery["body"],
            headers["sumfleet-timestamp"],
            headers["sumfleet-signature"],
            now=delivery["at"],
        )
    assert headers["content-type"] == "application/json"
    return headers


@pytest.mark.services
def test_signed_delivery_retried_after_a_500(
    api: ApiServer, api_settings: Settings, key: Key, start_worker, receivers
) -> None:
    start_worker(api_settings, GATED)
    receiver = receivers(500)  # the first attempt fails, the retry succeeds
    sdk = openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0)
    uploaded = sdk.files.create(
        file=("hook.jsonl", jsonl([request_line("a", "One. Two.", model=GATED)])), purpose="batch"
    )
    batch = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"callback_url": f"{receiver.url}/hooks/sumfleet"},
    )
    wait_for(lambda: len(receiver.received) >= 2, 60, "the webhook and its retry")
    first, second = receiver.received[:2]
    assert (first["status"], second["status"]) == (500, 200)
    assert first["path"] == second["path"] == "/hooks/sumfleet"
    headers = [_check_signed(first, key), _check_signed(second, key)]
    assert headers[0]["sumfleet-event"] == headers[1]["sumfleet-event"] == "batch.completed"
    assert headers[0]["sumfleet-delivery"] == headers[1]["sumfleet-delivery"]  # one delivery, tried twice
    assert first["body"] == second["body"]
    payload = json.loads(second["body"])
    assert payload["object"] == "batch" and payload["id"] == batch.id and payload["status"] == "completed"
    assert payload["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert payload["output_file_id"] == sdk.batches.retrieve(batch.id).output_file_id

    engine = open_database(api_settings.database_url)
    with session_factory(engine)() as session:

        def delivered():
            rows = deliveries_for(session, batch.id)
            session.expire_all()
            return rows if rows and rows[0].state == "delivered" else None

        rows = wait_for(delivered, 10, "the delivery to be recorded")
    engine.dispose()
    assert len(rows) == 1 and (rows[0].attempts, rows[0].last_status) == (2, 200)
    assert len(receiver.received) == 2  # delivered: no more attempts


@pytest.mark.services
def test_cancelled_native_and_failed_openai_batches_notify(api: ApiServer, key: Key, receivers) -> None:
    receiver = receivers()
    with httpx.Client(base_url=api.url, headers=key.headers) as http:
        native = http.post(
            "/api/v1/batches",
            json={"documents": ["One. Two."], "model": "lead", "callback_url": f"{receiver.url}/native"},
        ).json()
        assert native["callback_url"] == f"{receiver.url}/native"
        http.post(f"/api/v1/batches/{native['id']}/cancel")
        sdk = openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0)
        uploaded = sdk.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch")
        failed = sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"callback_url": f"{receiver.url}/openai"},
        )
        assert failed.status == "failed"
        bad = http.post("/api/v1/batches", json={"documents": ["x."], "model": "lead", "callback_url": "ftp://x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "callback_url"
    wait_for(lambda: len(receiver.received) >= 2, 30, "both webhooks")
    by_path = {d["path"]: d for d in receiver.received}
    native_hook = by_path["/native"]
    assert _check_signed(native_hook, key)["sumfleet-event"] == "batch.cancelled"
    body = json.loads(native_hook["body"])
    assert (body["object"], body["id"], body["state"], body["counts"]) == (
        "summary_batch",
        native["id"],
        "cancelled",
        {"cancelled": 1},
    )
    openai_hook = by_path["/openai"]
    assert _check_signed(openai_hook, key)["sumfleet-event"] == "batch.failed"
    body = json.loads(openai_hook["body"])
    assert body["id"] == failed.id and body["status"] == "failed"
    assert body["errors"]["data"][0]["code"] == "invalid_json_line"


@pytest.mark.services
def test_a_restarted_api_resumes_pending_deliveries(
    api_settings: Settings, own_database: str, start_api, receivers
) -> None:
    settings = api_settings.model_copy(update={"database_url": own_database, "api_webhook_backoff": 0.2})
    port = free_port()  # nothing listens there yet: attempts fail with "connection refused"
    first = start_api(settings).wait_ready()
    key = new_key(settings)
    with httpx.Client(base_url=first.url, headers=key.headers) as http:
        batch = http.post(
            "/api/v1/batches",
            json={"documents": ["One. Two."], "model": "lead", "callback_url": f"http://127.0.0.1:{port}/late"},
        ).json()
        http.post(f"/api/v1/batches/{batch['id']}/cancel")
    engine = open_database(own_database)
    sessions = session_factory(engine)

    def delivery():
        with sessions() as session:
            rows = deliveries_for(session, batch["id"])
            return rows[0] if rows else None

    failing = wait_for(lambda: (d := delivery()) and d.attempts >= 2 and d, 30, "failed attempts")
    assert failing.state == "pending" and "ConnectError" in failing.last_error
    first.stop()  # the API goes away with the delivery still owed

    receiver = receivers(port=port)
    start_api(settings).wait_ready()  # a new process picks it up from the database
    wait_for(lambda: receiver.received, 30, "the resumed delivery")
    assert _check_signed(receiver.received[0], key)["sumfleet-event"] == "batch.cancelled"
    done = wait_for(lambda: (d := delivery()) and d.state == "delivered" and d, 10, "the delivery to be recorded")
    assert done.attempts > failing.attempts
    engine.dispose()


@pytest.mark.services
def test_two_api_processes_end_each_batch_and_send_its_webhook_once(
    api: ApiServer, api_settings: Settings, key: Key, start_api, start_worker, receivers
) -> None:
    from sqlalchemy import func, select

    from models.tables import ApiFile, WebhookDelivery

    start_api(api_settings).wait_ready()  # a second process running the same background loop
    start_worker(api_settings, GATED)
    receiver = receivers()
    sdk = openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0)
    uploaded = sdk.files.create(
        file=("two.jsonl", jsonl([request_line(f"r{i}", "One. Two.", model=GATED) for i in range(3)])), purpose="batch"
    )
    made = [
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"callback_url": f"{receiver.url}/{i}"},
        ).id
        for i in range(5)
    ]
    wait_for(lambda: len(receiver.received) >= 5, 60, "five webhooks")
    time.sleep(3 * api_settings.api_poll_interval)  # room for a duplicate, were there one
    assert sorted(d["path"] for d in receiver.received) == [f"/{i}" for i in range(5)]
    assert sorted(json.loads(d["body"])["id"] for d in receiver.received) == sorted(made)
    engine = open_database(api_settings.database_url)
    with session_factory(engine)() as session:
        deliveries = dict(
            session.execute(
                select(WebhookDelivery.api_batch_id, func.count())
                .where(WebhookDelivery.api_batch_id.in_(made))
                .group_by(WebhookDelivery.api_batch_id)
            ).all()
        )
        files = dict(
            session.execute(
                select(ApiFile.api_batch_id, func.count())
                .where(ApiFile.api_batch_id.in_(made))
                .group_by(ApiFile.api_batch_id)
            ).all()
        )
    engine.dispose()
    assert deliveries == {batch_id: 1 for batch_id in made}
    assert files == {batch_id: 1 for batch_id in made}  # one output file each (no errors), made by one process


@pytest.mark.services
def test_webhooks_to_private_addresses_are_refused_by_default(
    api_settings: Settings, own_database: str, start_api, receivers
) -> None:
    receiver = receivers()
    allowed = api_settings.model_copy(update={"database_url": own_database})
    strict = allowed.model_copy(update={"api_webhook_private": False})
    first = start_api(allowed).wait_ready()
    key = new_key(allowed)
    with httpx.Client(base_url=first.url, headers=key.headers) as http:  # no worker: the batch stays queued
        batch = http.post(
            "/api/v1/batches",
            json={"documents": ["One. Two."], "model": "lead", "callback_url": f"{receiver.url}/private"},
        ).json()
    first.stop()

    second = start_api(strict).wait_ready()
    with httpx.Client(base_url=second.url, headers=key.headers) as http:
        for url, address in (
            (f"{receiver.url}/x", "127.0.0.1"),
            ("http://localhost:9/x", None),
            ("http://10.1.2.3/x", "10.1.2.3"),
        ):
            refused = http.post("/api/v1/batches", json={"documents": ["x."], "model": "lead", "callback_url": url})
            assert refused.status_code == 400, refused.text
            message = refused.json()["error"]["message"]
            assert message.startswith(f"callback_url {url!r} points at a private or local address (")
            assert address is None or f"({address})" in message
        sdk = openai.OpenAI(api_key=key.secret, base_url=f"{second.url}/v1", max_retries=0)
        uploaded = sdk.files.create(file=("p.jsonl", jsonl([request_line("a", "One. Two.")])), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused_sdk:
            sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"callback_url": "http://127.0.0.1:9/x"},
            )
        assert refused_sdk.value.body["param"] == "metadata.callback_url"  # type: ignore[index]
        # a delivery accepted earlier (or whose name now resolves privately) is checked again when sent
        assert http.post(f"/api/v1/batches/{batch['id']}/cancel").status_code == 200
    engine = open_database(own_database)
    sessions = session_factory(engine)

    def delivery():
        with sessions() as session:
            rows = deliveries_for(session, batch["id"])
            return rows[0] if rows and rows[0].state != "pending" else None

    done = wait_for(delivery, 30, "the delivery to be refused")
    assert done.state == "failed" and done.attempts == 1
    assert done.last_error.startswith(
        f"refused: {receiver.url}/private resolves to the private or local address 127.0.0.1"
    )
    assert receiver.received == []
    engine.dispose()


@pytest.mark.services
def test_a_standard_secret_verifies_a_real_delivery_as_it_is(api: ApiServer, api_settings: Settings, receivers) -> None:
    """A key whose webhook secret is `whsec_<standard base64>` (the spec's form): the receiver gives
    that very text to the OpenAI SDK."""
    from sqlalchemy import update

    from models.tables import ApiKey

    made = new_key(api_settings, "standard")
    secret = "whsec_" + base64.b64encode(b"\xfb\xef" + secrets.token_bytes(30)).decode()  # has + or /, and =
    engine = open_database(api_settings.database_url)
    with session_factory(engine).begin() as session:
        session.execute(update(ApiKey).where(ApiKey.id == made.id).values(webhook_secret=secret))
    engine.dispose()
    key = Key(made.id, made.secret, secret)
    receiver = receivers()
    with httpx.Client(base_url=api.url, headers=key.headers) as http:
        batch = http.post(
            "/api/v1/batches",
            json={"documents": ["One. Two."], "model": "lead", "callback_url": f"{receiver.url}/standard"},
        ).json()
        assert http.post(f"/api/v1/batches/{batch['id']}/cancel").status_code == 200
    wait_for(lambda: receiver.received, 30, "the webhook")
    delivery = receiver.received[0]
    event = openai.OpenAI(api_key="x").webhooks.unwrap(delivery["body"], delivery["headers"], secret=secret)
    assert event.id == batch["id"]
    assert delivery["headers"]["webhook-signature"].startswith("v1,")
    assert _check_signed(delivery, key)["sumfleet-event"] == "batch.cancelled"
