"""`validating` is seen: a batch of an input file over SUMFLEET_API_VALIDATE_ASYNC_BYTES is answered
at once and its file is checked in the background, ending `in_progress` or `failed` (OpenAI's
`errors`); a validation whose process died is taken over by the background pass of the API.
On a real `sumfleet api` over PostgreSQL, through the official `openai` package.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import create_key, new_id
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, Batch, Job
from tests.api.conftest import GATED, ApiServer, Key, jsonl, request_line
from tests.conftest import wait_for

pytestmark = pytest.mark.services

THRESHOLD = 300  # bytes: larger input files are validated in the background
ENDED = ("in_progress", "failed", "completed", "cancelled", "expired")


@pytest.fixture(scope="module")
def api_settings(pg_url: str, redis_url: str) -> Settings:
    """The module's API (see tests/api/conftest.py), validating files over THRESHOLD bytes in the background."""
    return Settings(
        database_url=pg_url,
        broker_url=redis_url,
        queue=f"sumfleet.api-test-{secrets.token_hex(4)}",
        chunk_size=4,
        api_poll_interval=0.2,
        api_max_upload_bytes=64 * 1024,
        api_max_documents=50,
        api_models=f"lead,{GATED}",
        api_webhook_private=True,
        api_validate_async_bytes=THRESHOLD,
    )


def _rows(count: int) -> list[dict[str, Any]]:
    return [request_line(f"r{i}", f"Request {i} opens here. It has a second sentence.") for i in range(count)]


def _create(sdk: openai.OpenAI, data: bytes) -> Any:
    uploaded = sdk.files.create(file=("in.jsonl", data), purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def _settled(sdk: openai.OpenAI, batch_id: str) -> Any:
    return wait_for(
        lambda: (b := sdk.batches.retrieve(batch_id)).status in ENDED and b, 60, f"batch {batch_id} to leave validating"
    )


def _jobs(db: sessionmaker[Session], batch_id: str) -> int:
    with db() as session:
        record = session.get(ApiBatch, batch_id)
        assert record is not None
        if record.batch_id is None:
            return 0
        return session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == record.batch_id)) or 0


def _held(db: sessionmaker[Session], owner: str, file_id: str, claimed_until: Any, **values: Any) -> str:
    """A `validating` batch as an API process leaves it: committed, its claim on the validation until
    `claimed_until` (past or None: its process died; future: a live process reads the file)."""
    now = utcnow()
    record_id = new_id("batch_")
    with db.begin() as session:
        session.add(
            ApiBatch(
                id=record_id,
                kind="openai",
                owner=owner,
                status="validating",
                endpoint="/v1/chat/completions",
                input_file_id=file_id,
                completion_window="24h",
                created_at=now,
                expires_at=now + timedelta(hours=24),
                claimed_until=claimed_until,
                **values,
            )
        )
    return record_id


def test_a_large_file_is_answered_validating_then_runs(sdk: openai.OpenAI, db: sessionmaker[Session]) -> None:
    data = jsonl(_rows(5))
    assert len(data) > THRESHOLD
    created = _create(sdk, data)
    assert created.status == "validating"  # answered before the file is read
    assert created.in_progress_at is None and created.errors is None
    assert created.request_counts is not None and created.request_counts.total == 0
    done = _settled(sdk, created.id)
    assert done.status == "in_progress" and done.in_progress_at is not None and done.model == "lead"
    assert done.request_counts is not None and done.request_counts.total == 5
    assert _jobs(db, created.id) == 5
    assert [b.id for b in sdk.batches.list()][:1] == [created.id]


def test_a_large_bad_file_is_answered_validating_then_fails_with_its_errors(
    sdk: openai.OpenAI, db: sessionmaker[Session]
) -> None:
    rows = _rows(4)
    rows[1]["url"] = "/v1/embeddings"
    rows[3]["custom_id"] = "r0"
    created = _create(sdk, jsonl(rows) + b"not json\n")
    assert created.status == "validating"
    failed = _settled(sdk, created.id)
    assert failed.status == "failed" and failed.failed_at is not None and failed.in_progress_at is None
    assert failed.errors is not None
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("invalid_url", 2),
        ("duplicate_custom_id", 4),
        ("invalid_json_line", 5),
    ]
    assert failed.errors.data[1].message == 'line 4: duplicate custom_id "r0" (first at line 1)'
    assert _jobs(db, created.id) == 0


def test_a_small_file_is_still_validated_before_the_answer(sdk: openai.OpenAI) -> None:
    data = jsonl([request_line("a", "Short. Text.")])
    assert len(data) <= THRESHOLD
    assert _create(sdk, data).status == "in_progress"
    assert _create(sdk, b"[1]\n").status == "failed"


def test_a_validation_left_by_a_dead_process_is_taken_over(
    sdk: openai.OpenAI, key: Key, db: sessionmaker[Session], http: httpx.Client
) -> None:
    file_id = sdk.files.create(file=("in.jsonl", jsonl(_rows(3))), purpose="batch").id
    live = _held(db, key.id, file_id, utcnow() + timedelta(hours=1))  # a live process still reads it
    dead = _held(db, key.id, file_id, utcnow() - timedelta(seconds=1))  # its process died: the lease ran out
    never = _held(db, key.id, file_id, None)  # its process died before it took the claim back
    for record_id in (dead, never):
        resumed = _settled(sdk, record_id)
        assert resumed.status == "in_progress" and resumed.request_counts.total == 3
        assert _jobs(db, record_id) == 3
    assert sdk.batches.retrieve(live).status == "validating"  # a held claim is left alone
    with db.begin() as session:
        session.execute(update(ApiBatch).where(ApiBatch.id == live).values(claimed_until=utcnow()))
    assert _settled(sdk, live).status == "in_progress" and _jobs(db, live) == 3


def test_a_batch_cancelled_or_expired_while_validating_never_runs(
    sdk: openai.OpenAI, key: Key, db: sessionmaker[Session]
) -> None:
    file_id = sdk.files.create(file=("in.jsonl", jsonl(_rows(3))), purpose="batch").id
    cancelled = _held(db, key.id, file_id, utcnow() + timedelta(hours=1))
    expired = _held(
        db,
        key.id,
        file_id,
        utcnow() + timedelta(hours=1),
    )
    assert sdk.batches.cancel(cancelled).status in ("cancelling", "cancelled")
    with db.begin() as session:
        session.execute(
            update(ApiBatch).where(ApiBatch.id == expired).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    ended = wait_for(lambda: (b := sdk.batches.retrieve(expired)).status == "expired" and b, 30, "the batch to expire")
    assert ended.expired_at is not None
    assert sdk.batches.retrieve(cancelled).status == "cancelled"
    with db.begin() as session:  # their claims run out: nothing takes them over, nothing is submitted
        session.execute(update(ApiBatch).where(ApiBatch.id.in_([cancelled, expired])).values(claimed_until=None))
    probe = _held(db, key.id, file_id, None)
    assert _settled(sdk, probe).status == "in_progress"  # the pass has run since
    assert (_jobs(db, cancelled), _jobs(db, expired)) == (0, 0)
    with db() as session:
        made = select(func.count()).select_from(Batch).where(Batch.source.like(f"%({file_id})"))
        assert session.scalar(made) == 1  # the probe's only


def test_the_daily_quota_fails_a_batch_validated_in_the_background(api: ApiServer, db: sessionmaker[Session]) -> None:
    with db.begin() as session:
        made = create_key(session, "quota", documents_per_day=4)
    limited = openai.OpenAI(api_key=made.secret, base_url=f"{api.url}/v1", max_retries=0, timeout=30)
    created = _create(limited, jsonl(_rows(5)))
    assert created.status == "validating"
    failed = _settled(limited, created.id)
    assert failed.status == "failed" and failed.errors is not None
    (error,) = failed.errors.data
    assert error.code == "documents_per_day_exceeded"
    assert error.message is not None and "this batch has 5 document(s), and 0 of the 4 documents" in error.message
    assert _settled(limited, _create(limited, jsonl(_rows(4))).id).status == "in_progress"


def test_validating_batches_count_as_in_flight(api: ApiServer, db: sessionmaker[Session]) -> None:
    with db.begin() as session:
        made = create_key(session, "in-flight", batches_in_flight=1)
    limited = openai.OpenAI(api_key=made.secret, base_url=f"{api.url}/v1", max_retries=0, timeout=30)
    file_id = limited.files.create(file=("in.jsonl", jsonl(_rows(3))), purpose="batch").id
    _held(db, made.id, file_id, utcnow() + timedelta(hours=1))
    with pytest.raises(openai.RateLimitError) as refused:
        limited.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "batches_in_flight_exceeded"
    assert int(refused.value.response.headers["Retry-After"]) >= 1
