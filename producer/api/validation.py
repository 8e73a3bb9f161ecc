"""Validating an OpenAI batch's input file, and submitting its requests: at once, or in the background.

Creating a batch first commits its record as `validating`, holding the input file (a delete or an
expiry of the file waits until the batch has read it) and a claim on the work with a lease. Then
the file is read, checked and submitted, ending `in_progress` (its jobs and the move committed in
one transaction) or `failed` (OpenAI's `errors`). A file up to SUMFLEET_API_VALIDATE_ASYNC_BYTES
is validated before the answer, so the batch is answered `in_progress` or `failed`; a larger one is
answered `validating` at once and validated by a thread of the `Validator`.

Nothing accepted is lost when an API process dies: the record is in the database before the
answer, the claim's lease runs out `LEASE` seconds after the reader last renewed it, and the
background pass of every API process (`Validator.resume_due`) takes unclaimed `validating` batches
over. Every end is a conditional move out of `validating`, so of two readers only one submits
(the other's transaction rolls back), and a batch cancelled or expired while validating stays so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, cast

from sqlalchemy.orm import Session, sessionmaker

from models.adapters import split_model
from models.api_store import (
    add_rejections,
    claim_validation,
    discard_validating,
    iter_upload_lines,
    renew_validation,
    set_status,
    unclaimed_validations,
)
from models.errors import BrokerError, DatabaseError, InputError, NotPublished, RowProblem, SumfleetError
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiBatch, ApiFile, Batch
from producer.api.batch_input import BatchInput, LineError, first_model
from producer.api.checks import model_problem
from producer.api.errors import ApiError, sumfleet_error
from producer.api.lifecycle import advance, notify
from producer.api.limits import admit
from producer.client import Client

log = logging.getLogger(__name__)

LEASE = 60.0  # seconds a claim on a validating batch lasts unless its reader renews it
RENEW_EVERY = 15.0  # seconds between renewals while a file is read
RETRY_LATER = 30.0  # seconds before a validation that met an unreachable broker or database is tried again
WORKERS = 2  # background validations one API process runs at once


class _Lost(Exception):
    """The batch is no longer `validating` (cancelled, expired, or submitted by another process)."""


class _Stopped(Exception):
    """The API process is shutting down: leave the batch to the next process."""


def in_background(settings: Settings, size: int) -> bool:
    """Whether a batch of an input file of `size` bytes is answered `validating` and checked in the background."""
    threshold = settings.api_validate_async_bytes
    return threshold is not None and size > threshold


def _held(
    lines: Iterator[bytes], sessions: sessionmaker[Session], record_id: str, stop: threading.Event | None
) -> Iterator[bytes]:
    """`lines`, renewing the claim on the batch every RENEW_EVERY seconds while they are read."""
    renew_at = time.monotonic() + RENEW_EVERY
    for line in lines:
        if stop is not None and stop.is_set():
            raise _Stopped
        if time.monotonic() >= renew_at:
            with sessions.begin() as session:
                if not renew_validation(session, record_id, utcnow() + timedelta(seconds=LEASE)):
                    raise _Lost
            renew_at = time.monotonic() + RENEW_EVERY
        yield line


def _error_item(code: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": None}


def _fail(sessions: sessionmaker[Session], record: ApiBatch, errors: list[dict[str, Any]], model: str | None) -> None:
    """Move the batch from `validating` to `failed` with OpenAI's `errors` (and queue its webhook)."""
    with sessions.begin() as session:
        moved = set_status(
            session,
            record.id,
            ["validating"],
            "failed",
            errors=errors,
            failed_at=utcnow(),
            model=model,
            claimed_until=None,
        )
        if moved:
            notify(session, record, "failed")
    if moved:
        log.info("batch %s failed validation: %s", record.id, errors[0]["message"], extra={"batch_id": record.id})


def _submit(
    client: Client, settings: Settings, record: ApiBatch, reader: BatchInput, model: str | None, source: str
) -> bool:
    """Submit the file's runnable requests, moving the batch to `in_progress` in the same transaction;
    False when nothing was submitted (the file has errors, or no runnable request)."""
    if reader.errors or model is None:
        for _ in reader.documents():  # check every line, so all errors are reported at once
            pass
        return False

    def before_commit(session: Session, batch: Batch) -> None:
        admit(session, record.owner, settings, documents=batch.total, new_batch=False)  # 429 over the day's quota
        moved = set_status(
            session,
            record.id,
            ["validating"],
            "in_progress",
            batch_id=batch.id,
            model=model,
            in_progress_at=utcnow(),
            claimed_until=None,
        )
        if not moved:
            raise _Lost
        add_rejections(session, record.id, (r.row() for r in reader.rejected))

    base, adapter = split_model(model)  # "smollm2:my-adapter" runs smollm2 with that adapter
    try:
        client.submit_documents(
            reader.documents(),
            cast("list[RowProblem]", reader.errors),  # the one list the reader fills as it goes
            source=source,
            skip_bad_rows=False,
            publish=True,
            model=base,
            adapter=adapter,
            before_commit=before_commit,
        )
    except InputError:
        return False  # reported from the reader's own lists
    except NotPublished:
        pass  # saved, if not published: the sweeper (or `sumfleet requeue`) publishes it later
    return True


def _keep_unsubmitted(sessions: sessionmaker[Session], record: ApiBatch, reader: BatchInput, model: str | None) -> None:
    """A batch none of whose requests runs: failed with the file's errors, or in progress with its rejections
    only (it ends at once, with its error file)."""
    if reader.errors or not reader.rejected:
        errors = reader.openai_errors() or [_error_item("empty_file", "the input file has no requests")]
        _fail(sessions, record, errors, model)
        return
    with sessions.begin() as session:
        moved = set_status(
            session, record.id, ["validating"], "in_progress", in_progress_at=utcnow(), model=model, claimed_until=None
        )
        if moved:
            add_rejections(session, record.id, (r.row() for r in reader.rejected))


def validate(
    client: Client,
    settings: Settings,
    accepted: list[str],
    record_id: str,
    *,
    inline: bool,
    stop: threading.Event | None = None,
) -> None:
    """Read, check and submit the input file of a `validating` batch, and move the batch on.

    `inline` (the request waits for it): a refusal that a caller could act on (a quota, the broker
    unreachable, an unknown adapter) deletes the batch and is raised, so the request is answered as
    if no batch had been made. In the background the batch ends `failed` with the reason instead, or,
    when the broker or the database is away, is left `validating` to be tried again later.
    """
    sessions = client.sessions
    with sessions() as session:
        record = session.get(ApiBatch, record_id)
        if record is None or record.status != "validating":
            return
        session.expunge(record)
        file = session.get(ApiFile, record.input_file_id) if record.input_file_id else None
        name = file.filename if file is not None else "input file"
    file_id = record.input_file_id or ""

    model: str | None = None
    try:
        found = first_model(_held(iter_upload_lines(sessions, file_id), sessions, record_id, stop))
        model = found[1] if found else None
        reader = BatchInput(
            _held(iter_upload_lines(sessions, file_id), sessions, record_id, stop),
            endpoint=record.endpoint or "",
            model=model,
            max_requests=settings.api_max_documents,
            max_chars=settings.max_document_chars,
            default_max_tokens=settings.max_new_tokens,
        )
        base = split_model(found[1])[0] if found else None
        if found is not None and base and (problem := model_problem(base, settings, accepted)) is not None:
            reader.errors.append(LineError(found[0], "model_not_found", problem, "body.model"))
        submitted = _submit(client, settings, record, reader, model, f"{name} ({file_id})")
    except _Lost:
        log.info("batch %s left validating before it was submitted", record_id, extra={"batch_id": record_id})
        return
    except _Stopped:
        with sessions.begin() as session:
            renew_validation(session, record_id, None)  # the next process takes it at once
        return
    except ApiError as refused:  # a quota of the key
        if inline:
            _discard(sessions, record_id)
            raise
        _fail(sessions, record, [_error_item(refused.code, refused.message)], model)
        return
    except (BrokerError, DatabaseError) as away:
        if inline:
            _discard(sessions, record_id)
            raise
        log.warning("batch %s: cannot submit now (%s); trying again later", record_id, away)
        with sessions.begin() as session:
            renew_validation(session, record_id, utcnow() + timedelta(seconds=RETRY_LATER))
        return
    except SumfleetError as error:  # e.g. an unknown adapter in the model's name
        if inline:
            _discard(sessions, record_id)
            raise
        answer = sumfleet_error(error)
        _fail(sessions, record, [_error_item(answer.code, f"{name}: {answer.message}")], model)
        return
    except BaseException:
        if inline:
            _discard(sessions, record_id)
        raise  # in the background: the claim runs out and the batch is taken again
    if not submitted:
        _keep_unsubmitted(sessions, record, reader, model)
    advance(sessions, record_id)


def _discard(sessions: sessionmaker[Session], record_id: str) -> None:
    try:
        with sessions.begin() as session:
            discard_validating(session, record_id)
    except Exception:  # the database may be what failed: the batch stays validating and is taken again later
        log.exception("batch %s: could not delete it after a failed creation", record_id)


class Validator:
    """Validates batches in the background, `WORKERS` at a time, in threads of this API process."""

    def __init__(self, client: Client, settings: Settings, accepted: list[str], workers: int = WORKERS) -> None:
        self.client = client
        self.settings = settings
        self.accepted = accepted
        self._stop = threading.Event()
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sumfleet-api-validate")
        self._lock = threading.Lock()
        self._mine: set[str] = set()  # ids queued or running here

    def start(self, record_id: str) -> None:
        """Validate a batch this process holds the claim of, in the background."""
        with self._lock:
            if self._stop.is_set() or record_id in self._mine:
                return
            self._mine.add(record_id)
        self._pool.submit(self._run, record_id)

    def resume_due(self) -> int:
        """Hold on to the batches queued or running here, and take over `validating` batches nobody holds
        (their process died, or gave them back) while a thread is free; returns how many were taken."""
        sessions = self.client.sessions
        with self._lock:
            mine = sorted(self._mine)
        for record_id in mine:  # those waiting for a thread keep their claims too
            with sessions.begin() as session:
                renew_validation(session, record_id, utcnow() + timedelta(seconds=LEASE))
        with sessions() as session:
            due = unclaimed_validations(session)
        started = 0
        for record_id in due:
            with self._lock:
                if record_id in self._mine or len(self._mine) >= self.workers:
                    continue
            with sessions.begin() as session:
                won = claim_validation(session, record_id, utcnow() + timedelta(seconds=LEASE))
            if won:
                log.info("batch %s: resuming its validation", record_id, extra={"batch_id": record_id})
                self.start(record_id)
                started += 1
        return started

    def _run(self, record_id: str) -> None:
        try:
            validate(self.client, self.settings, self.accepted, record_id, inline=False, stop=self._stop)
        except Exception:
            log.exception("batch %s: validation failed; it is taken again once its claim runs out", record_id)
        finally:
            with self._lock:
                self._mine.discard(record_id)

    def stop(self) -> None:
        """Stop reading (running validations give their batches back), and give back those not started."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            left, self._mine = set(self._mine), set()
        for record_id in left:
            try:
                with self.client.sessions.begin() as session:
                    renew_validation(session, record_id, None)
            except Exception:  # the claim runs out by itself
                log.warning("batch %s: could not give its validation back", record_id)
