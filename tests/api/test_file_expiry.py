"""Files expire, OpenAI's way (`expires_after` on upload, `expires_at` on the file object, the
server's SUMFLEET_API_FILE_TTL_SECONDS by default), and the API's background pass deletes them:
on a real `sumfleet api` over PostgreSQL, the clock moved through the file's row.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import new_id
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, ApiFile, ApiFileChunk, Job
from tests.api.conftest import ApiServer, Key, jsonl, request_line
from tests.conftest import wait_for

pytestmark = pytest.mark.services

ROWS = [request_line(f"r{i}", f"Request {i} opens here. It has a second sentence.") for i in range(3)]


def _expire(db: sessionmaker[Session], file_id: str) -> None:
    """Move the file's clock: it expired a second ago."""
    with db.begin() as session:
        session.execute(update(ApiFile).where(ApiFile.id == file_id).values(expires_at=utcnow() - timedelta(seconds=1)))


def _settled(http: httpx.Client, batch_id: str) -> dict[str, Any]:
    def left_validating() -> dict[str, Any] | None:
        batch: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        return batch if batch["status"] != "validating" else None

    return wait_for(left_validating, 30, f"batch {batch_id} to leave validating")


def _stored(db: sessionmaker[Session], file_id: str) -> tuple[bool, int]:
    """(its row exists, its stored pieces)."""
    with db() as session:
        pieces = select(func.count()).select_from(ApiFileChunk).where(ApiFileChunk.file_id == file_id)
        return session.get(ApiFile, file_id) is not None, session.scalar(pieces) or 0


def test_the_sdk_uploads_a_file_that_expires_and_it_is_gone_and_deleted_after(
    sdk: openai.OpenAI, db: sessionmaker[Session], http: httpx.Client
) -> None:
    kept = sdk.files.create(file=("kept.jsonl", jsonl(ROWS)), purpose="batch")
    assert kept.expires_at is None  # the module's server has no default lifetime
    made = sdk.files.create(
        file=("short.jsonl", jsonl(ROWS)), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert made.expires_at == made.created_at + 3600
    assert sdk.files.retrieve(made.id).expires_at == made.expires_at
    assert _stored(db, made.id) == (True, 1)
    _expire(db, made.id)
    with pytest.raises(openai.NotFoundError):  # gone for its owner at once, before the pass deletes it
        sdk.files.retrieve(made.id)
    assert http.get(f"/v1/files/{made.id}/content").status_code == 404
    assert [f.id for f in sdk.files.list()] == [kept.id]
    wait_for(lambda: _stored(db, made.id) == (False, 0), 30, "the expired file to be deleted")
    assert _stored(db, kept.id) == (True, 1)


def test_expires_after_is_checked(http: httpx.Client) -> None:
    def upload(**fields: str) -> httpx.Response:
        return http.post("/v1/files", files={"file": ("a.jsonl", jsonl(ROWS))}, data={"purpose": "batch", **fields})

    short = upload(**{"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"})
    assert short.status_code == 400
    assert short.json()["error"]["param"] == "expires_after.seconds"
    assert "from 3600 (an hour) to 2592000 (30 days), got 60" in short.json()["error"]["message"]
    anchor = upload(**{"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"})
    assert anchor.status_code == 400 and anchor.json()["error"]["param"] == "expires_after.anchor"
    missing = upload(**{"expires_after[seconds]": "3600"})
    assert missing.status_code == 400 and "it is missing" in missing.json()["error"]["message"]
    as_json = upload(expires_after='{"anchor": "created_at", "seconds": 2592000}')
    assert as_json.status_code == 200
    assert as_json.json()["expires_at"] == as_json.json()["created_at"] + 2_592_000
    assert http.get("/v1/files").json()["data"] == [as_json.json()]  # refused uploads stored nothing


def test_a_batch_that_read_the_file_keeps_its_requests(
    sdk: openai.OpenAI, db: sessionmaker[Session], http: httpx.Client
) -> None:
    uploaded = sdk.files.create(
        file=("in.jsonl", jsonl(ROWS)), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "in_progress"  # no worker serves the module's queue: its requests wait
    _expire(db, uploaded.id)
    wait_for(lambda: _stored(db, uploaded.id) == (False, 0), 30, "the expired file to be deleted")
    after = sdk.batches.retrieve(batch.id)
    assert after.status == "in_progress" and after.input_file_id == uploaded.id
    assert after.request_counts is not None and after.request_counts.total == 3
    with db() as session:
        record = session.get(ApiBatch, batch.id)
        assert record is not None
        jobs = select(func.count()).select_from(Job).where(Job.batch_id == record.batch_id)
        assert session.scalar(jobs) == 3
    refused = http.post(
        "/v1/batches",
        json={"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "input_file_id"


def test_output_and_error_files_expire_by_output_expires_after(sdk: openai.OpenAI) -> None:
    rows = [request_line(f"bad-{i}", "A fine text. Its max_tokens is not.", max_tokens=0) for i in range(2)]
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 7200}},
    )  # every request is refused on its own: the batch ends at once with its error file
    done = wait_for(lambda: (b := sdk.batches.retrieve(batch.id)).status == "completed" and b, 30, "the batch to end")
    assert done.error_file_id is not None and done.output_file_id is None
    error_file = sdk.files.retrieve(done.error_file_id)
    assert error_file.expires_at == error_file.created_at + 7200
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 10}},
        )
    assert "output_expires_after.seconds" in str(refused.value)


def test_the_server_default_lifetime(
    api_settings: Settings, key: Key, db: sessionmaker[Session], start_api: Callable[..., ApiServer]
) -> None:
    server = start_api(api_settings.model_copy(update={"api_file_ttl_seconds": 1})).wait_ready()
    client = openai.OpenAI(api_key=key.secret, base_url=f"{server.url}/v1", max_retries=0, timeout=30)
    short = client.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="batch")
    assert short.expires_at == short.created_at + 1
    own = client.files.create(
        file=("b.jsonl", jsonl(ROWS)), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert own.expires_at == own.created_at + 3600  # the upload's own lifetime wins
    wait_for(lambda: _stored(db, short.id) == (False, 0), 30, "the file past the server's lifetime to be deleted")
    assert [f.id for f in client.files.list()] == [own.id]


def test_a_file_a_batch_is_validating_keeps_its_bytes_until_the_batch_has_read_them(
    api: ApiServer, key: Key, db: sessionmaker[Session], http: httpx.Client
) -> None:
    first = http.post("/v1/files", files={"file": ("in.jsonl", jsonl(ROWS))}, data={"purpose": "batch"}).json()
    second = http.post("/v1/files", files={"file": ("in.jsonl", jsonl(ROWS))}, data={"purpose": "batch"}).json()
    now = utcnow()
    held, other = new_id("batch_"), new_id("batch_")
    with db.begin() as session:  # batches a live process is validating (it holds their claims for an hour)
        for record_id, file_id in ((held, first["id"]), (other, second["id"])):
            session.add(
                ApiBatch(
                    id=record_id,
                    kind="openai",
                    owner=key.id,
                    status="validating",
                    endpoint="/v1/chat/completions",
                    input_file_id=file_id,
                    completion_window="24h",
                    created_at=now,
                    expires_at=now + timedelta(hours=24),
                    claimed_until=now + timedelta(hours=1),
                )
            )
    _expire(db, first["id"])
    deleted = http.delete(f"/v1/files/{second['id']}")  # deleted by its owner while it is read
    assert deleted.status_code == 200 and deleted.json() == {"id": second["id"], "object": "file", "deleted": True}
    assert http.get(f"/v1/files/{first['id']}").status_code == 404
    assert http.get(f"/v1/files/{second['id']}").status_code == 404
    probe = http.post("/v1/files", files={"file": ("p.jsonl", jsonl(ROWS))}, data={"purpose": "batch"}).json()
    _expire(db, probe["id"])  # a file no batch reads: once it is deleted, the pass has run past the others
    wait_for(lambda: _stored(db, probe["id"]) == (False, 0), 30, "an unread expired file to be deleted")
    assert _stored(db, first["id"]) == (True, 1) and _stored(db, second["id"]) == (True, 1)
    with db.begin() as session:  # the claims run out (as when their process died): the API takes them over
        session.execute(update(ApiBatch).where(ApiBatch.id.in_([held, other])).values(claimed_until=None))
    for record_id in (held, other):
        batch = _settled(http, record_id)
        assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 3
    wait_for(lambda: _stored(db, first["id"]) == (False, 0), 30, "the expired file to be deleted once read")
    wait_for(lambda: _stored(db, second["id"]) == (False, 0), 30, "the deleted file's bytes to go once read")
