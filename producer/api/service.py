"""The HTTP API's work on the database: every transaction a route needs, behind plain functions.

Routes parse the request, call these, and turn what comes back (or a `SumfleetError`) into an
HTTP answer. Functions that only read and write take the `sessionmaker`; those that submit,
cancel or reach the database itself take the `Client`. Objects of another key are as absent
as missing ones (None), like in `models.api_store`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, cast

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models.adapters import split_model
from models.api_store import (
    add_rejections,
    add_upload,
    delete_file,
    get_api_batch,
    get_file,
    iter_upload,
    iter_upload_lines,
    key_for_secret,
    list_api_batches,
    list_files,
    new_id,
    set_status,
)
from models.broker import check_broker
from models.db import hide_password
from models.errors import BrokerError, InputError, NotPublished, RowProblem, SumfleetError
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, ApiFile, ApiKey, Batch
from producer.api.batch_input import BatchInput, LineError, first_model
from producer.api.checks import model_problem
from producer.api.lifecycle import (
    advance,
    cancel_jobs,
    error_lines,
    expiry,
    native_objects,
    notify,
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
    sessions: sessionmaker[Session], owner: str, filename: str, purpose: str, chunks: Iterable[bytes]
) -> ApiFile:
    """Store an uploaded file of `owner` in one transaction (nothing is kept when `chunks` raises)."""
    with sessions.begin() as session:
        return add_upload(session, owner, filename, purpose, chunks)


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


def create_openai_batch(
    client: Client,
    settings: Settings,
    accepted: list[str],
    owner: str,
    file: ApiFile,
    body: BatchCreate,
    callback_url: str | None,
) -> str:
    """Create `owner`'s batch of an uploaded file (submitted, or failed with its errors); returns its id."""
    now = utcnow()
    record = ApiBatch(
        id=new_id("batch_"),
        kind="openai",
        owner=owner,
        status="in_progress",
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        meta=body.metadata,
        callback_url=callback_url,
        created_at=now,
        in_progress_at=now,
        expires_at=expiry(now, body.completion_window),
    )
    found = first_model(iter_upload_lines(client.sessions, file.id))
    record.model = found[1] if found else None
    reader = BatchInput(
        iter_upload_lines(client.sessions, file.id),
        endpoint=body.endpoint,
        model=record.model,
        max_requests=settings.api_max_documents,
        max_chars=settings.max_document_chars,
        default_max_tokens=settings.max_new_tokens,
    )
    model = split_model(found[1])[0] if found else None
    if found is not None and model and (problem := model_problem(model, settings, accepted)) is not None:
        reader.errors.append(LineError(found[0], "model_not_found", problem, "body.model"))
    if not _submitted(client, record, reader, f"{file.filename} ({file.id})"):
        _keep_unsubmitted(client.sessions, record, reader, now)
    if record.status != "failed":
        advance(client.sessions, record.id)
    return record.id


def _submitted(client: Client, record: ApiBatch, reader: BatchInput, source: str) -> bool:
    """Submit the file's runnable requests with `record` (and its rejections); False when nothing was."""
    if reader.errors or record.model is None:
        for _ in reader.documents():  # check every line, so all errors are reported at once
            pass
        return False

    def before_commit(session: Session, batch: Batch) -> None:
        record.batch_id = batch.id
        session.add(record)
        session.flush()
        add_rejections(session, record.id, (r.row() for r in reader.rejected))

    model, adapter = split_model(record.model)  # "smollm2:my-adapter" runs smollm2 with that adapter
    try:
        client.submit_documents(
            reader.documents(),
            cast("list[RowProblem]", reader.errors),  # the one list the reader fills as it goes
            source=source,
            skip_bad_rows=False,
            publish=True,
            model=model,
            adapter=adapter,
            before_commit=before_commit,
        )
    except InputError:
        return False  # reported from the reader's own lists
    except NotPublished:
        return True  # saved, if not published: the sweeper (or `sumfleet requeue`) publishes it later
    except BrokerError:
        if record.batch_id is None:  # nothing was saved: the caller answers it like any other SumfleetError
            raise
    return True  # saved, if not published: the sweeper (or `sumfleet requeue`) publishes it later


def _keep_unsubmitted(sessions: sessionmaker[Session], record: ApiBatch, reader: BatchInput, now: datetime) -> None:
    """Save a record none of whose requests runs: failed with the file's errors, or with its rejections only."""
    with sessions.begin() as session:
        record.batch_id = None
        if reader.errors or not reader.rejected:
            errors = reader.openai_errors() or [
                {"code": "empty_file", "message": "the input file has no requests", "param": None, "line": None}
            ]
            record.status, record.errors, record.failed_at = "failed", errors, now
            record.in_progress_at = None
            session.add(record)
            notify(session, record, "failed")
        else:  # every request was refused on its own: nothing to run, the batch ends with its error file
            session.add(record)
            session.flush()
            add_rejections(session, record.id, (r.row() for r in reader.rejected))


def cancel_openai_batch(sessions: sessionmaker[Session], record: ApiBatch) -> None:
    """Cancel a batch still running (queued requests never run) and move it on; any other is left as it is."""
    if record.status not in ("in_progress", "validating"):
        return
    with sessions.begin() as session:
        if set_status(session, record.id, [record.status], "cancelling", cancelling_at=utcnow()):
            cancel_jobs(session, record.batch_id)
    advance(sessions, record.id)
