"""The API's service layer on a real SQLite database: its transactions, without HTTP or a broker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from models.api_store import create_key
from models.job_writer import add_jobs
from models.settings import Settings
from models.store import create_batch, utcnow
from models.tables import ApiBatch, Batch, Job
from producer.api import service
from producer.api.background import Maintainer
from producer.api.schemas import BatchCreate
from producer.client import Client


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[Client]:
    made = Client(sqlite_settings)
    made.ensure_schema()
    yield made
    made.close()


def _owner(client: Client, name: str = "tenant") -> str:
    with client.sessions.begin() as session:
        return create_key(session, name).id


def _batch(client: Client, owner: str, kind: str, documents: int = 2) -> str:
    """An API record of `kind` over a batch of `documents` queued jobs; returns the record's id."""
    with client.sessions.begin() as session:
        batch = create_batch(
            session,
            model="lead",
            queue="q",
            prompt_name="one-sentence",
            prompt_template="{document}",
            params={"max_new_tokens": 8},
            source="test",
        )
        add_jobs(session, batch, ({"doc_id": f"d{i}", "text": f"text {i}"} for i in range(documents)))
        record_id = batch.id if kind == "native" else f"batch_{batch.id}"
        session.add(
            ApiBatch(
                id=record_id,
                kind=kind,
                owner=owner,
                batch_id=batch.id,
                status="in_progress",
                endpoint="/v1/chat/completions" if kind == "openai" else None,
                created_at=utcnow(),
                in_progress_at=utcnow(),
            )
        )
    return record_id


def test_a_key_is_found_by_its_secret_only(client: Client) -> None:
    with client.sessions.begin() as session:
        made = create_key(session, "k")
    found = service.find_key(client.sessions, made.secret)
    assert found is not None and found.id == made.id
    assert service.find_key(client.sessions, made.secret + "x") is None


def test_files_are_stored_owned_streamed_listed_and_deleted(client: Client) -> None:
    owner, other = _owner(client), _owner(client, "other")
    stored = service.store_upload(client.sessions, owner, "in.jsonl", "batch", iter([b"a\n", b"bc\n"]))
    assert stored.size == 5
    assert service.owned_file(client.sessions, other, stored.id) is None
    file = service.owned_file(client.sessions, owner, stored.id)
    assert file is not None and b"".join(service.file_content(client.sessions, file)) == b"a\nbc\n"
    listed = service.file_page(client.sessions, owner, purpose="batch", after=None, limit=10)
    assert listed is not None and [f.id for f in listed[0]] == [file.id] and not listed[1]
    assert service.file_page(client.sessions, owner, purpose="batch_output", after=None, limit=10) == ([], False)
    assert service.file_page(client.sessions, other, purpose=None, after=stored.id, limit=10) is None
    assert service.remove_file(client.sessions, other, stored.id) is False
    assert service.remove_file(client.sessions, owner, stored.id) is True
    assert service.owned_file(client.sessions, owner, stored.id) is None


def test_an_upload_that_fails_midway_keeps_nothing(client: Client) -> None:
    owner = _owner(client)

    def chunks() -> Iterator[bytes]:
        yield b"first\n"
        raise OSError("the client went away")

    with pytest.raises(OSError):
        service.store_upload(client.sessions, owner, "in.jsonl", "batch", chunks())
    assert service.file_page(client.sessions, owner, purpose=None, after=None, limit=10) == ([], False)


def test_batches_are_paged_by_kind_and_owner(client: Client) -> None:
    owner, other = _owner(client), _owner(client, "other")
    first, second = _batch(client, owner, "native"), _batch(client, owner, "native")
    openai = _batch(client, owner, "openai")
    found = service.batch_page(client.sessions, owner, "native", after=None, limit=1)
    assert found is not None
    objects, more = found
    assert [o["id"] for o in objects] == [second] and more
    assert objects[0]["object"] == "summary_batch" and objects[0]["total"] == 2
    found = service.batch_page(client.sessions, owner, "native", after=second, limit=5)
    assert found is not None and [o["id"] for o in found[0]] == [first] and not found[1]
    assert service.batch_page(client.sessions, other, "native", after=first, limit=5) is None
    assert service.owned_batch(client.sessions, other, first, "native") is None
    assert service.owned_batch(client.sessions, owner, first, "openai") is None
    assert service.batch_object(client.sessions, openai)["object"] == "batch"


def test_cancelling_an_openai_batch_ends_it_with_its_error_file(client: Client) -> None:
    owner = _owner(client)
    record_id = _batch(client, owner, "openai", documents=2)
    record = service.owned_batch(client.sessions, owner, record_id, "openai")
    assert record is not None
    service.cancel_openai_batch(client.sessions, record)
    ended = service.batch_object(client.sessions, record_id)
    assert ended["status"] == "cancelled" and ended["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    assert ended["output_file_id"] is None
    error_file = service.owned_file(client.sessions, owner, ended["error_file_id"])
    assert error_file is not None
    lines = [json.loads(line) for line in service.file_content(client.sessions, error_file)]
    assert [(line["custom_id"], line["error"]["code"]) for line in lines] == [
        ("d0", "batch_cancelled"),
        ("d1", "batch_cancelled"),
    ]
    record = service.owned_batch(client.sessions, owner, record_id, "openai")
    assert record is not None
    service.cancel_openai_batch(client.sessions, record)  # an ended batch is left as it is
    assert service.batch_object(client.sessions, record_id) == ended


def test_a_file_of_bad_lines_makes_a_failed_batch(client: Client) -> None:
    owner = _owner(client)
    file = service.store_upload(client.sessions, owner, "in.jsonl", "batch", iter([b"not json\n", b"[]\n"]))
    body = BatchCreate(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    record_id = service.create_openai_batch(client, client.settings, ["lead"], owner, file, body, None)
    made = service.batch_object(client.sessions, record_id)
    assert made["status"] == "failed" and made["failed_at"] is not None and made["in_progress_at"] is None
    assert [(e["code"], e["line"]) for e in made["errors"]["data"]] == [
        ("invalid_json_line", 1),
        ("invalid_json_line", 2),
    ]
    assert service.batch_page(client.sessions, owner, "openai", after=None, limit=5) == ([made], False)


def test_the_background_pass_deletes_batches_past_the_retention_period(client: Client) -> None:
    owner = _owner(client)
    old, recent, running = (_batch(client, owner, "native") for _ in range(3))
    for record_id, ended_days_ago in ((old, 10), (recent, 1)):
        client.cancel(record_id)
        with client.sessions.begin() as session:
            batch = session.get(Batch, record_id)
            assert batch is not None
            batch.finished_at = utcnow() - timedelta(days=ended_days_ago)
    Maintainer(client.sessions, client.settings.model_copy(update={"retention_days": 7})).pass_once()
    with client.sessions() as session:
        assert session.get(Batch, old) is None and session.get(ApiBatch, old) is None
        assert session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == old)) == 0
        assert session.get(Batch, recent) is not None  # ended a day ago: kept
        assert session.get(Batch, running) is not None and session.get(ApiBatch, running) is not None
    Maintainer(client.sessions, client.settings).pass_once()  # no retention set: nothing is deleted
    with client.sessions() as session:
        assert session.get(Batch, recent) is not None
