"""The HTTP API's work on the database: every transaction a route needs, behind plain functions.

Routes parse the request, call these, and turn what comes back (or a `SumfleetError`) into an
HTTP answer. Functions that only read and write take the `sessionmaker`; those that submit,
cancel or reach the database itself take the `Client`. Objects of another key are as absent
as missing ones (None), like in `models.api_store`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import (
    add_upload,
    delete_file,
    get_api_batch,
    get_file,
    iter_upload,
    key_for_secret,
    list_api_batches,
    list_files,
    new_id,
    set_status,
)
from models.broker import check_broker
from models.db import hide_password
from models.errors import InputError, RowProblem, SumfleetError
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, ApiFile, ApiKey, Batch
from producer.api import checks, limits, validation
from producer.api.lifecycle import (
    advance,
    cancel_jobs,
    error_lines,
    expiry,
    native_objects,
    openai_objects,
    output_lines,
    render,
)
from producer.api.schemas import BatchCreate, SummaryOptions
from producer.client import Client, Submission
from producer.inputs import Document

_OBJECTS: dict[str, Callable[[Session, list[ApiBatch]], list[dict[str, Any]]]] = {
    "openai": openai_objects,
    "native": native_objects,
}

# --- service and keys -----------------------------------------------------------------------------


def ping(client: Client) -> None:
    """Run `SELECT 1` on the database; any driver error is raised as it is."""
    with client.database.connect() as connection:
        connection.execute(text("SELECT 1"))


def unreachable(client: Client) -> list[str]:
    """What the API needs and cannot reach now, in words naming it (the database, the broker);
    empty when both answer."""
    problems = []
    try:
        ping(client)
    except Exception as error:  # any driver error: the database is not usable
        first = str(getattr(error, "orig", None) or error).strip().splitlines()[:1]
        where = hide_password(client.settings.database_url)
        problems.append(f"database unreachable ({where}): {type(error).__name__}: {' '.join(first)}")
    try:
        check_broker(client.app)
    except SumfleetError as error:
        problems.append(f"broker unreachable: {error}")
    return problems


def find_key(sessions: sessionmaker[Session], secret: str) -> ApiKey | None:
    """The key whose secret this is (revoked or not), or None."""
    with sessions() as session:
        return key_for_secret(session, secret)


# --- files ----------------------------------------------------------------------------------------


def store_upload(
    sessions: sessionmaker[Session],
    owner: str,
    filename: str,
    purpose: str,
    chunks: Iterable[bytes],
    expires_after: int | None = None,
) -> ApiFile:
    """Store an uploaded file of `owner` in one transaction (nothing is kept when `chunks` raises);
    it expires `expires_after` seconds after its upload (None: kept until deleted)."""
    with sessions.begin() as session:
        return add_upload(session, owner, filename, purpose, chunks, expires_after)


def file_page(
    sessions: sessionmaker[Session], owner: str, *, purpose: str | None, after: str | None, limit: int
) -> tuple[list[ApiFile], bool] | None:
    """`owner`'s files newest first, before `after`; None when `after` names no file of `owner`."""
    with sessions() as session:
        return list_files(session, owner, after=after, limit=limit, purpose=purpose)


def owned_file(sessions: sessionmaker[Session], owner: str, file_id: str) -> ApiFile | None:
    """`owner`'s file `file_id`, or None."""
    with sessions() as session:
        return get_file(session, owner, file_id)


def remove_file(sessions: sessionmaker[Session], owner: str, file_id: str) -> bool:
    """Delete `owner`'s file `file_id`; False when `owner` has no such file."""
    with sessions.begin() as session:
        return delete_file(session, owner, file_id)


def file_content(sessions: sessionmaker[Session], file: ApiFile) -> Iterator[bytes]:
    """A file's bytes, read as they are consumed: an upload's pieces, or the lines of a batch's output or error file."""
    if file.kind == "upload":
        return iter_upload(sessions, file.id)
    return _generated(sessions, file)


def _generated(sessions: sessionmaker[Session], file: ApiFile) -> Iterator[bytes]:
    """The lines of an output or error file, made from its batch's jobs (none once the batch is gone)."""
    with sessions() as session:
        record = session.get(ApiBatch, file.api_batch_id)
        if record is None:
            return
        session.expunge(record)
        yield from output_lines(session, record) if file.kind == "output" else error_lines(session, record)


# --- batches of both kinds ------------------------------------------------------------------------


def owned_batch(sessions: sessionmaker[Session], owner: str, batch_id: str, kind: str) -> ApiBatch | None:
    """`owner`'s API batch `batch_id` of `kind` (openai, native), or None."""
    with sessions() as session:
        return get_api_batch(session, owner, batch_id, kind)


def batch_object(sessions: sessionmaker[Session], record_id: str) -> dict[str, Any]:
    """The API object of a record as it is now: an OpenAI batch or a native summary batch."""
    with sessions() as session:
        record = session.get(ApiBatch, record_id)
        assert record is not None
        return render(session, record)


def batch_page(
    sessions: sessionmaker[Session], owner: str, kind: str, *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool] | None:
    """Objects of `owner`'s batches of `kind`, newest first, before `after`; None when `after` names none of them."""
    with sessions() as session:
        found = list_api_batches(session, owner, kind, after=after, limit=limit)
        if found is None:
            return None
        records, more = found
        return _OBJECTS[kind](session, records), more


# --- native batches -------------------------------------------------------------------------------


def create_native_batch(
    client: Client,
    owner: str,
    documents: Iterable[Document],
    problems: list[RowProblem],
    *,
    source: str,
    options: SummaryOptions,
    model: str,
    callback_url: str | None,
    idempotency_key: str | None = None,
) -> Submission:
    """Submit documents as a batch of `owner` and its API record in one transaction (raises as `submit_documents`)."""

    def before_commit(session: Session, batch: Batch) -> None:
        limits.admit(session, owner, client.settings, documents=batch.total, new_batch=True)  # 429 over a quota
        session.add(
            ApiBatch(
                id=batch.id,
                kind="native",
                owner=owner,
                batch_id=batch.id,
                status="in_progress",
                callback_url=callback_url,
                created_at=batch.created_at,
                in_progress_at=utcnow(),
            )
        )

    return client.submit_documents(
        documents,
        problems,
        source=source,
        skip_bad_rows=options.skip_bad_rows,
        publish=True,
        model=model,
        prompt=options.prompt,
        max_new_tokens=options.max_new_tokens,
        language=options.language,
        max_words=options.max_words,
        long_documents=options.long_documents,
        trim=options.trim,
        adapter=options.adapter,
        idempotency_key=idempotency_key,
        before_commit=before_commit,
    )


def cancel_native_batch(client: Client, record: ApiBatch) -> None:
    """Cancel a native batch's queued documents and move its record on (`InvalidTransition` once it has ended)."""
    assert record.batch_id is not None
    client.cancel(record.batch_id)
    advance(client.sessions, record.id)


# --- OpenAI batches -------------------------------------------------------------------------------


def open_openai_batch(
    client: Client,
    settings: Settings,
    owner: str,
    file_id: str,
    body: BatchCreate,
    callback_url: str | None,
) -> ApiBatch | None:
    """Commit `owner`'s new batch of upload `file_id` as `validating`, with this process's claim on its
    validation; None when `owner` has no such upload now. Raises `ApiError` 429 when the key has too
    many batches in flight or no documents left today."""
    limits.precheck(client.sessions, owner, settings, documents=None)
    now = utcnow()
    with client.sessions.begin() as session:
        file = get_file(session, owner, file_id, lock=True)  # a delete or an expiry of the file now waits for us
        if file is None or file.kind != "upload":
            return None
        limits.admit(session, owner, settings, documents=0, new_batch=True)
        record = ApiBatch(
            id=new_id("batch_"),
            kind="openai",
            owner=owner,
            status="validating",
            endpoint=body.endpoint,
            input_file_id=file.id,
            completion_window=body.completion_window,
            meta=body.metadata,
            callback_url=callback_url,
            created_at=now,
            expires_at=expiry(now, body.completion_window),
            output_expires_after=output_expiry(body),
            claimed_until=now + timedelta(seconds=validation.LEASE),
        )
        session.add(record)
    return record


def output_expiry(body: BatchCreate) -> int | None:
    """Seconds the output and error files of a batch live (`output_expires_after`), or None (kept)."""
    given = body.output_expires_after
    return None if given is None else checks.expires_after(given, "output_expires_after")


def create_openai_batch(
    client: Client,
    settings: Settings,
    accepted: list[str],
    owner: str,
    file: ApiFile,
    body: BatchCreate,
    callback_url: str | None,
) -> str:
    """Create `owner`'s batch of an uploaded file and validate it now (submitted, or failed with its errors);
    returns its id. Raises `InputError` when the file is gone."""
    record = open_openai_batch(client, settings, owner, file.id, body, callback_url)
    if record is None:
        raise InputError(f"no file {file.id!r}: it was deleted or it expired")
    validation.validate(client, settings, accepted, record.id, inline=True)
    return record.id


def cancel_openai_batch(sessions: sessionmaker[Session], record: ApiBatch) -> None:
    """Cancel a batch still running (queued requests never run) and move it on; any other is left as it is."""
    if record.status not in ("in_progress", "validating"):
        return
    with sessions.begin() as session:
        if set_status(session, record.id, ["in_progress", "validating"], "cancelling", cancelling_at=utcnow()):
            fresh = session.get(ApiBatch, record.id, populate_existing=True)  # its jobs, if validated just now
            cancel_jobs(session, fresh.batch_id if fresh is not None else None)
    advance(sessions, record.id)
