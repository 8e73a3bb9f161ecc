"""Per-key limits of the HTTP API, on a real `sumfleet api` over PostgreSQL: requests per minute
(429 with `Retry-After`, OpenAI's `x-ratelimit-*` headers, one bucket shared by every API process),
documents per day (a batch over the quota refused whole, naming the numbers) and batches in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import create_key, take_request
from models.db import ensure_schema, open_database, session_factory
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, ApiKey
from tests.api.conftest import ApiServer, Key, jsonl, request_line
from tests.conftest import sumfleet

pytestmark = pytest.mark.services


def limited_key(sessions: sessionmaker[Session], **limits: int | None) -> Key:
    with sessions.begin() as session:
        made = create_key(session, "limited", **limits)
    return Key(made.id, made.secret, made.webhook_secret)


def _client(api: ApiServer, key: Key) -> httpx.Client:
    return httpx.Client(base_url=api.url, headers=key.headers, timeout=30)


def _refusal(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    assert int(response.headers["Retry-After"]) >= 1
    return error


def _native(http: httpx.Client, documents: int) -> httpx.Response:
    texts = [f"Document {i} opens here. It has a second sentence." for i in range(documents)]
    return http.post("/api/v1/batches", json={"documents": texts, "model": "lead"})


# --- requests per minute --------------------------------------------------------------------------


def test_requests_over_the_limit_get_429_with_retry_after_and_pass_again_after_it(
    api: ApiServer, db: sessionmaker[Session]
) -> None:
    key = limited_key(db, rate_limit_per_minute=60)  # a token a second
    with _client(api, key) as http:
        first = http.get("/v1/models")
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "60"
        assert int(first.headers["x-ratelimit-remaining-requests"]) == 59
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        answers = [http.get("/v1/models") for _ in range(200)]  # far more than a minute's worth at once
        refused = next(r for r in answers if r.status_code != 200)
        error = _refusal(refused, "rate_limit_exceeded")
        assert error["type"] == "requests"
        assert f"rate limit reached for API key {key.id} on requests per minute: limit 60" in error["message"]
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        time.sleep(int(refused.headers["Retry-After"]))
        again = http.get("/v1/models")
        assert again.status_code == 200, again.text
        assert int(again.headers["x-ratelimit-remaining-requests"]) >= 0


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
def test_the_bucket_refills_evenly_and_a_clock_running_behind_neither_refills_nor_drains_it(
    store: str, db: sessionmaker[Session], sqlite_settings: Settings
) -> None:
    engine = open_database(sqlite_settings.database_url) if store == "sqlite" else None
    if engine is not None:
        ensure_schema(engine, migrate=True)
    sessions = session_factory(engine) if engine is not None else db
    try:
        key = limited_key(sessions)

        def take(now: float) -> tuple[bool, float]:
            with sessions.begin() as session:
                return take_request(session, key.id, 2, now)  # two a minute: one token every 30 s

        assert take(1000.0) == (True, pytest.approx(1.0))
        assert take(1000.0) == (True, pytest.approx(0.0))
        assert take(1015.0) == (False, pytest.approx(0.5))
        assert take(1030.0) == (True, pytest.approx(0.0))
        assert take(1010.0) == (False, pytest.approx(0.0))  # another process's clock, behind: no refill
        assert take(1090.0) == (True, pytest.approx(1.0))  # a minute on: full (2), less this one
        assert take(5000.0) == (True, pytest.approx(1.0))  # never more than the limit
    finally:
        if engine is not None:
            engine.dispose()


def test_a_key_without_limits_is_not_counted(api: ApiServer, db: sessionmaker[Session], key: Key) -> None:
    with _client(api, key) as http:
        answers = [http.get("/v1/models") for _ in range(30)]
    assert {r.status_code for r in answers} == {200}
    assert all("x-ratelimit-limit-requests" not in r.headers for r in answers)
    with db() as session:
        row = session.get(ApiKey, key.id)
        assert row is not None and row.rate_tokens is None and row.rate_at is None  # nothing written per request


def test_every_api_process_shares_one_bucket(
    api: ApiServer, api_settings: Settings, db: sessionmaker[Session], start_api: Callable[..., ApiServer]
) -> None:
    other = start_api(api_settings).wait_ready()
    key = limited_key(db, rate_limit_per_minute=4)  # refills one request per 15 s
    with _client(api, key) as one, _client(other, key) as two:
        assert [one.get("/v1/models").status_code, two.get("/v1/models").status_code] == [200, 200]
        assert [two.get("/v1/models").status_code, one.get("/v1/models").status_code] == [200, 200]
        refused = two.get("/v1/models")
        _refusal(refused, "rate_limit_exceeded")
        assert 1 <= int(refused.headers["Retry-After"]) <= 15
        _refusal(one.get("/v1/models"), "rate_limit_exceeded")
        # refused before its body is read: an upload is neither parsed nor stored
        upload = one.post("/v1/files", files={"file": ("x.jsonl", b"not even json\n")}, data={"purpose": "batch"})
        _refusal(upload, "rate_limit_exceeded")
        with db.begin() as session:  # a minute passes for the bucket: it is full again
            session.execute(update(ApiKey).where(ApiKey.id == key.id).values(rate_at=ApiKey.rate_at - 60))
        assert one.get("/v1/files").json()["data"] == []
        assert two.get("/v1/models").headers["x-ratelimit-remaining-requests"] == "2"


def test_the_server_default_applies_to_keys_without_their_own_and_the_cli_sets_a_keys_own(
    api_settings: Settings, db: sessionmaker[Session], start_api: Callable[..., ApiServer]
) -> None:
    settings = api_settings.model_copy(update={"api_rate_limit_per_minute": 2})
    server = start_api(settings).wait_ready()
    plain = limited_key(db)
    unlimited = limited_key(db, rate_limit_per_minute=0)
    made = sumfleet("keys", "create", "--name", "cli", "--requests-per-minute", "5", "--json", settings=settings)
    assert made.returncode == 0, made.stderr.decode()
    created = json.loads(made.stdout)
    assert created["rate_limit_per_minute"] == 5 and created["documents_per_day"] is None
    own = Key(created["id"], created["api_key"], created["webhook_secret"])
    with _client(server, plain) as http:
        assert [http.get("/v1/models").status_code for _ in range(2)] == [200, 200]
        _refusal(http.get("/v1/models"), "rate_limit_exceeded")
    with _client(server, unlimited) as http:
        answers = [http.get("/v1/models") for _ in range(10)]
        assert {r.status_code for r in answers} == {200} and "x-ratelimit-limit-requests" not in answers[0].headers
    with _client(server, own) as http:
        assert http.get("/v1/models").headers["x-ratelimit-limit-requests"] == "5"
    changed = sumfleet("keys", "limits", own.id, "--requests-per-minute", "default", settings=settings)
    assert changed.returncode == 0, changed.stderr.decode()
    assert "requests-per-minute=default" in changed.stdout.decode()
    with _client(server, own) as http:
        assert http.get("/v1/models").headers["x-ratelimit-limit-requests"] == "2"
    bad = sumfleet("keys", "create", "--requests-per-minute", "-3", settings=settings)
    assert bad.returncode != 0 and "--requests-per-minute" in bad.stderr.decode()
    listed = sumfleet("keys", "list", "--json", settings=settings).stdout.decode().splitlines()
    rows = {row["id"]: row for row in map(json.loads, listed)}
    assert rows[unlimited.id]["rate_limit_per_minute"] == 0 and rows[own.id]["rate_limit_per_minute"] is None


# --- documents per day ----------------------------------------------------------------------------


def test_a_batch_over_the_daily_documents_quota_is_refused_whole_with_the_numbers(
    api: ApiServer, db: sessionmaker[Session]
) -> None:
    key = limited_key(db, documents_per_day=5)
    with _client(api, key) as http:
        assert _native(http, 3).status_code == 201
        refused = _native(http, 3)
        error = _refusal(refused, "documents_per_day_exceeded")
        tomorrow = (utcnow() + timedelta(days=1)).date().isoformat()
        assert error["type"] == "insufficient_quota"
        assert (
            f"documents-per-day quota exceeded for API key {key.id}: this batch has 3 document(s), and 3 of the 5 "
            f"documents a day are used today (UTC); the quota resets at {tomorrow}T00:00:00Z" in error["message"]
        )
        assert 1 <= int(refused.headers["Retry-After"]) <= 86_400
        assert _native(http, 2).status_code == 201  # exactly the rest of the day's quota
        assert "5 of the 5 documents" in _refusal(_native(http, 1), "documents_per_day_exceeded")["message"]
        listed = http.get("/api/v1/batches").json()["data"]
        assert sorted(b["total"] for b in listed) == [2, 3]  # the refused batches made nothing
        with db.begin() as session:  # the next day: the count starts again
            session.execute(
                update(ApiKey).where(ApiKey.id == key.id).values(documents_day=ApiKey.documents_day - timedelta(days=1))
            )
        assert _native(http, 4).status_code == 201
        with db() as session:
            row = session.get(ApiKey, key.id)
            assert row is not None and (row.documents_day, row.documents_used) == (utcnow().date(), 4)


def test_an_openai_batch_over_the_quota_is_refused_whole(api: ApiServer, db: sessionmaker[Session]) -> None:
    key = limited_key(db, documents_per_day=2)
    rows = [request_line(f"r{i}", f"Request {i} has text. It has two sentences.") for i in range(3)]
    with _client(api, key) as http:
        file = http.post("/v1/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"}).json()
        body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        error = _refusal(http.post("/v1/batches", json=body), "documents_per_day_exceeded")
        assert "this batch has 3 document(s), and 0 of the 2 documents" in error["message"]
        assert "the batch alone is over the daily quota of 2: split it" in error["message"]
        assert http.get("/v1/batches").json()["data"] == []  # no batch was made
        small = http.post("/v1/files", files={"file": ("in.jsonl", jsonl(rows[:2]))}, data={"purpose": "batch"})
        made = http.post("/v1/batches", json={**body, "input_file_id": small.json()["id"]})
        assert made.status_code == 200 and made.json()["request_counts"]["total"] == 2


def test_concurrent_submissions_never_pass_the_quota(api: ApiServer, db: sessionmaker[Session]) -> None:
    key = limited_key(db, documents_per_day=3)
    with _client(api, key) as http, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _native(http, 1).status_code, range(8)))
    assert sorted(answers) == [201] * 3 + [429] * 5
    with db() as session:
        row = session.get(ApiKey, key.id)
        assert row is not None and row.documents_used == 3


# --- batches in flight ----------------------------------------------------------------------------


def test_batches_in_flight_are_limited_and_a_slot_frees_when_one_ends(
    api: ApiServer, db: sessionmaker[Session]
) -> None:
    key = limited_key(db, batches_in_flight=2)  # no worker serves the module's queue: batches stay in progress
    with _client(api, key) as http, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _native(http, 1), range(6)))
        assert sorted(a.status_code for a in answers) == [201] * 2 + [429] * 4
        error = _refusal(next(a for a in answers if a.status_code == 429), "batches_in_flight_exceeded")
        assert f"batches-in-flight limit reached for API key {key.id}: 2 of 2 batches" in error["message"]
        with db() as session:
            count = select(func.count()).select_from(ApiBatch).where(ApiBatch.owner == key.id)
            assert session.scalar(count) == 2
        running = next(a for a in answers if a.status_code == 201).json()["id"]
        assert http.post(f"/api/v1/batches/{running}/cancel").status_code == 200
        assert http.get(f"/api/v1/batches/{running}").json()["state"] == "cancelled"
        assert _native(http, 1).status_code == 201
        _refusal(_native(http, 1), "batches_in_flight_exceeded")
