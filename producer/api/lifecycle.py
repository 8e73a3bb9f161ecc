"""What an API batch looks like (OpenAI batch objects, native batch objects, output and error
file lines), and how it moves through OpenAI's statuses.

    validating ──(file read and submitted)──► in_progress
        ├──(a bad file, a quota)──► failed
        ├──(cancel)──► cancelling ──► cancelled
        └──(expires_at passed)──► finalizing ──► expired
    in_progress ──(all jobs finished)──► finalizing ──► completed
        │  └──(expires_at passed: queued jobs cancelled)──► finalizing ──► expired
        └──(cancel: queued jobs cancelled)──► cancelling ──(running jobs done)──► cancelled
    (`producer.api.validation` moves validating to in_progress or failed; every other move is made here)

Every move is a conditional UPDATE on the record's status, so API processes running the same
pass at once never both make it; the move that ends a batch creates its output and error
files and its webhook delivery in the same transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import (
    JobLine,
    add_delivery,
    add_generated_file,
    iter_job_lines,
    iter_rejections,
    job_totals,
    live_running,
    rejection_counts,
    set_status,
)
from models.counters import Counts, counts_of
from models.errors import InvalidTransition
from models.registry import live_on, nobody_serves
from models.states import BatchState, JobState
from models.store import as_utc, cancel_batch, utcnow
from models.tables import ApiBatch, Batch
from producer.client import BatchStatus

log = logging.getLogger(__name__)

OPEN = ("validating", "in_progress", "finalizing", "cancelling")  # statuses the background pass moves on
ENDED = ("completed", "failed", "expired", "cancelled")
EVENTS = {status: f"batch.{status}" for status in ENDED}


def unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(as_utc(moment).timestamp())


# --- objects ------------------------------------------------------------------------------------


def openai_object(record: ApiBatch, totals: Counts | None, rejected: int, warning: str | None = None) -> dict[str, Any]:
    """The OpenAI `batch` object of a record; cancelled and unfinished-at-the-end requests count as failed."""
    totals = totals or Counts({})
    completed = totals[JobState.SUCCEEDED]
    failed = totals[JobState.FAILED] + totals[JobState.CANCELLED] + rejected
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": unix(record.created_at),
        "in_progress_at": unix(record.in_progress_at),
        "expires_at": unix(record.expires_at),
        "finalizing_at": unix(record.finalizing_at),
        "completed_at": unix(record.completed_at),
        "failed_at": unix(record.failed_at),
        "expired_at": unix(record.expired_at),
        "cancelling_at": unix(record.cancelling_at),
        "cancelled_at": unix(record.cancelled_at),
        "request_counts": {"total": totals.total + rejected, "completed": completed, "failed": failed},
        "usage": {
            "input_tokens": totals.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": totals.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": totals.prompt_tokens + totals.output_tokens,
        },
        "metadata": record.meta,
        "warning": warning,  # not OpenAI's: clients ignore it, operators read it
    }


def openai_objects(session: Session, records: list[ApiBatch]) -> list[dict[str, Any]]:
    """OpenAI objects of several records: two queries for all their counts, one for their batches."""
    totals = job_totals(session, [r.batch_id for r in records if r.batch_id])
    rejected = rejection_counts(session, [r.id for r in records])
    ids = [r.batch_id for r in records if r.batch_id]
    batches = {b.id: b for b in session.scalars(select(Batch).where(Batch.id.in_(ids)))} if ids else {}
    unserved = _unserved(session)
    return [
        openai_object(
            r,
            totals.get(r.batch_id) if r.batch_id else None,
            rejected.get(r.id, 0),
            unserved(batches[r.batch_id]) if r.batch_id in batches else None,
        )
        for r in records
    ]


def _unserved(session: Session) -> Callable[[Batch], str | None]:
    """The warning of a batch whose queue no live worker consumes (one registry query per queue)."""
    served: dict[str, bool] = {}

    def warning(batch: Batch) -> str | None:
        if BatchState(batch.state).finished:
            return None
        if batch.queue not in served:
            served[batch.queue] = live_on(session, batch.queue) > 0
        return None if served[batch.queue] else nobody_serves(batch.model, batch.queue)

    return warning


def native_object(record: ApiBatch, batch: Batch, totals: Counts, warning: str | None = None) -> dict[str, Any]:
    """A native batch: the `sumfleet status --json` fields, plus its webhook and results URL."""
    return {
        **BatchStatus.of(batch, totals.by_state, warning).as_dict(),
        "object": "summary_batch",
        "callback_url": record.callback_url,
        "results_url": f"/api/v1/batches/{record.id}/results",
    }


def native_objects(session: Session, records: list[ApiBatch]) -> list[dict[str, Any]]:
    ids = [r.batch_id for r in records if r.batch_id]
    batches = {b.id: b for b in session.scalars(select(Batch).where(Batch.id.in_(ids)))} if ids else {}
    warning = _unserved(session)
    return [
        native_object(record, batch, counts_of(batch), warning(batch))
        for record in records
        if (batch := batches.get(record.batch_id or "")) is not None
    ]


def render(session: Session, record: ApiBatch) -> dict[str, Any]:
    objects = openai_objects(session, [record]) if record.kind == "openai" else native_objects(session, [record])
    return objects[0]


# --- output and error files -----------------------------------------------------------------------


def _ids(record: ApiBatch, kind: str, number: int) -> tuple[str, str]:
    """Stable (line id, request id) of one request, the same on every download."""
    digest = hashlib.sha256(f"{record.id}/{kind}/{number}".encode()).hexdigest()
    return f"batch_req_{digest[:24]}", f"req_{digest[24:48]}"


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _completion(record: ApiBatch, job: JobLine, request_id: str) -> dict[str, Any]:
    prompt, output = job.prompt_tokens or 0, job.output_tokens or 0
    stopped = (
        job.max_new_tokens is not None and job.output_tokens is not None and job.output_tokens >= job.max_new_tokens
    )
    return {
        "id": f"chatcmpl-{request_id[4:]}",
        "object": "chat.completion",
        "created": unix(job.finished_at),
        "model": record.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.summary, "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if stopped else "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output},
        "system_fingerprint": None,
    }


def output_lines(session: Session, record: ApiBatch) -> Iterator[bytes]:
    """The output file: one line per request that succeeded, in input order."""
    if record.batch_id is None:
        return
    for job in iter_job_lines(session, record.batch_id, [JobState.SUCCEEDED.value]):
        line_id, request_id = _ids(record, "job", job.id)
        yield _line(
            {
                "id": line_id,
                "custom_id": job.custom_id,
                "response": {
                    "status_code": 200,
                    "request_id": request_id,
                    "body": _completion(record, job, request_id),
                },
                "error": None,
            }
        )


def error_lines(session: Session, record: ApiBatch) -> Iterator[bytes]:
    """The error file: requests refused at creation (400), failed in the worker (500), and those
    the batch never ran because it was cancelled or expired (`error` set, no response)."""
    for rejection in iter_rejections(session, record.id):
        line_id, request_id = _ids(record, "rejection", rejection.id)
        body = {
            "error": {
                "message": f"line {rejection.line}: {rejection.message}",
                "type": "invalid_request_error",
                "param": rejection.param,
                "code": rejection.code,
            }
        }
        yield _line(
            {
                "id": line_id,
                "custom_id": rejection.custom_id,
                "response": {"status_code": rejection.status_code, "request_id": request_id, "body": body},
                "error": None,
            }
        )
    if record.batch_id is None:
        return
    unfinished = {
        "code": "batch_expired" if record.end_reason == "expired" else "batch_cancelled",
        "message": "the request was not run before the batch's completion window ended"
        if record.end_reason == "expired"
        else "the request was not run: the batch was cancelled",
    }
    states = [s.value for s in (JobState.FAILED, JobState.CANCELLED, JobState.QUEUED, JobState.RUNNING)]
    for job in iter_job_lines(session, record.batch_id, states):
        line_id, request_id = _ids(record, "job", job.id)
        if job.state == JobState.FAILED.value:
            body = {
                "error": {
                    "message": job.error or "generation failed",
                    "type": "server_error",
                    "param": None,
                    "code": "generation_failed",
                }
            }
            yield _line(
                {
                    "id": line_id,
                    "custom_id": job.custom_id,
                    "response": {"status_code": 500, "request_id": request_id, "body": body},
                    "error": None,
                }
            )
        else:
            yield _line({"id": line_id, "custom_id": job.custom_id, "response": None, "error": unfinished})


def _measure(lines: Iterator[bytes]) -> int | None:
    """Total bytes of `lines`, or None when there are none (no file is made)."""
    size = None
    for line in lines:
        size = (size or 0) + len(line)
    return size


# --- moving on ----------------------------------------------------------------------------------


class _Lost(Exception):
    """Another process made this move first: roll back."""


def notify(session: Session, record: ApiBatch, status: str) -> None:
    """Queue the webhook delivery of a batch that just ended (same transaction as the move)."""
    if not record.callback_url:
        return
    session.flush()
    fresh = session.get(ApiBatch, record.id, populate_existing=True)
    assert fresh is not None
    payload = json.dumps(render(session, fresh), ensure_ascii=False, separators=(",", ":"))
    add_delivery(
        session,
        api_batch_id=record.id,
        owner=record.owner,
        url=record.callback_url,
        event=EVENTS[status],
        payload=payload,
    )


def _finish(sessions: sessionmaker[Session], record_id: str, expected: str, final: str) -> bool:
    """Make the output and error files, move `expected` -> `final`, queue the webhook: one transaction."""
    now = utcnow()
    with sessions() as session:
        record = session.get(ApiBatch, record_id)
        assert record is not None
        sizes = (
            (None, None)
            if record.kind != "openai"
            else (
                _measure(output_lines(session, record)),
                _measure(error_lines(session, record)),
            )
        )
    try:
        with sessions.begin() as session:
            record = session.get(ApiBatch, record_id)
            assert record is not None
            values: dict[str, Any] = {f"{final}_at": now}
            lives = record.output_expires_after
            if sizes[0] is not None:
                values["output_file_id"] = add_generated_file(
                    session, record.owner, record.id, "output", sizes[0], lives
                ).id
            if sizes[1] is not None:
                values["error_file_id"] = add_generated_file(
                    session, record.owner, record.id, "error", sizes[1], lives
                ).id
            if not set_status(session, record_id, [expected], final, **values):
                raise _Lost
            notify(session, record, final)
    except _Lost:
        return False
    log.info("batch %s %s", record_id, final, extra={"batch_id": record_id})
    return True


def cancel_jobs(session: Session, batch_id: str | None) -> None:
    """Cancel the queued jobs of an underlying batch that has not ended (running ones finish)."""
    if batch_id is None:
        return
    batch = session.get(Batch, batch_id)
    if batch is not None and not BatchState(batch.state).finished:
        with contextlib.suppress(InvalidTransition):  # its last job finished just now: nothing left to cancel
            cancel_batch(session, batch_id)


def advance(sessions: sessionmaker[Session], record_id: str) -> str | None:
    """Move one open record on as far as it can go now; returns its status after."""
    now = utcnow()
    with sessions() as session:
        record = session.get(ApiBatch, record_id)
        if record is None or record.status not in OPEN:
            return None if record is None else record.status
        batch = session.get(Batch, record.batch_id) if record.batch_id else None
        status, kind, batch_id = record.status, record.kind, record.batch_id
        expires_at = as_utc(record.expires_at) if record.expires_at else None
        batch_state = BatchState(batch.state) if batch is not None else None
        busy = live_running(session, batch_id, now) if batch_id else 0

    if kind == "native":
        if batch_state is None or (batch_state.finished and busy == 0):
            final = "cancelled" if batch_state == BatchState.CANCELLED else "completed"
            return final if _finish(sessions, record_id, status, final) else None
        return status

    if status == "validating":  # its reader moves it on, unless its window runs out first
        if expires_at is not None and now >= expires_at:
            with sessions.begin() as session:
                if set_status(
                    session,
                    record_id,
                    [status],
                    "finalizing",
                    finalizing_at=now,
                    end_reason="expired",
                    claimed_until=None,
                ):
                    log.info("batch %s expired while validating", record_id, extra={"batch_id": record_id})
            return advance(sessions, record_id)
        return status

    if status == "in_progress":
        if expires_at is not None and now >= expires_at:
            with sessions.begin() as session:
                if set_status(session, record_id, [status], "finalizing", finalizing_at=now, end_reason="expired"):
                    cancel_jobs(session, batch_id)
                    log.info("batch %s expired: queued requests cancelled", record_id, extra={"batch_id": record_id})
            return advance(sessions, record_id)
        if batch_state is None or batch_state == BatchState.COMPLETED:
            with sessions.begin() as session:
                set_status(session, record_id, [status], "finalizing", finalizing_at=now)
            return advance(sessions, record_id)
        if batch_state == BatchState.CANCELLED:  # cancelled outside the API (`sumfleet cancel`)
            with sessions.begin() as session:
                set_status(session, record_id, [status], "cancelling", cancelling_at=now)
            return advance(sessions, record_id)
        return status

    # finalizing or cancelling: end once no worker is still running one of its requests
    if busy:
        return status
    with sessions() as session:
        record = session.get(ApiBatch, record_id)
        assert record is not None
        reason = record.end_reason
    final = "cancelled" if status == "cancelling" else ("expired" if reason == "expired" else "completed")
    _finish(sessions, record_id, status, final)
    with sessions() as session:
        record = session.get(ApiBatch, record_id)
        return None if record is None else record.status


def advance_all(sessions: sessionmaker[Session]) -> int:
    """One pass over every open record; returns how many ended."""
    from models.api_store import active_api_batches

    with sessions() as session:
        open_ids = active_api_batches(session, OPEN)
    ended = 0
    for record_id in open_ids:
        try:
            if advance(sessions, record_id) in ENDED:
                ended += 1
        except Exception:  # one broken record must not stop the others
            log.exception("batch %s: could not move it on", record_id, extra={"batch_id": record_id})
    return ended


def expiry(created: datetime, window: str) -> datetime:
    """When a batch created at `created` with completion window `window` ("24h") expires."""
    return created + timedelta(hours=int(window.removesuffix("h")))
