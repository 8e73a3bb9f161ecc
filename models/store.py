"""Every read and write of batches and jobs. State changes happen here and nowhere else.

Writes that finish a job are conditional (`WHERE state = 'running' AND worker = me`), so a
chunk delivered twice can never write a second result.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, defer, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from models.db import rowcount
from models.errors import BatchNotFoundError, InvalidTransition
from models.states import UNFINISHED_JOB_STATES, BatchState, JobState, batch_sources_for, moves
from models.tables import Batch, Job

# an outcome moves a running job to succeeded or failed (one value: finish_jobs runs as executemany)
(_FINISHED_FROM,) = set(moves(JobState.SUCCEEDED, JobState.RUNNING)) & set(moves(JobState.FAILED, JobState.RUNNING))


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime (SQLite hands back naive ones)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def new_batch_id() -> str:
    """A short random id, safe in URLs, file names and shell variables."""
    return "b" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """What a worker needs of a job it is about to summarize."""

    id: int
    doc_id: str
    text: str
    attempts: int
    request: dict[str, Any] | None = None  # its own chat messages and generation settings, if any


@dataclass(slots=True)
class JobOutcome:
    """The result of one job, as the engine hands it back."""

    job_id: int
    summary: str | None = None
    error: str | None = None
    prompt_variant: str | None = None  # which language variant of the prompt ran
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    generation_seconds: float | None = None
    pieces: int | None = None  # a long document: pieces it was split into
    levels: int | None = None  # and summarizing levels it took (1: the pieces, 2: their summaries, ...)

    @property
    def state(self) -> JobState:
        return JobState.FAILED if self.error is not None else JobState.SUCCEEDED


@dataclass
class BatchCounts:
    """How many jobs of a batch are in each state."""

    by_state: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, state: JobState) -> int:
        return self.by_state.get(state.value, 0)


def create_batch(
    session: Session,
    *,
    model: str,
    queue: str,
    prompt_name: str,
    prompt_template: str,
    params: dict[str, Any],
    source: str | None,
) -> Batch:
    """Add a new, empty batch (the caller adds its jobs in the same transaction)."""
    batch = Batch(
        id=new_batch_id(),
        state=BatchState.QUEUED.value,
        model=model,
        queue=queue,
        prompt_name=prompt_name,
        prompt_template=prompt_template,
        params=params,
        source=source,
        total=0,
        created_at=utcnow(),
    )
    session.add(batch)
    session.flush()
    return batch


def add_jobs(session: Session, batch: Batch, rows: Iterable[dict[str, Any]], insert_batch: int) -> int:
    """Insert one queued job per row (`doc_id`, `text`, `meta`) in multi-row INSERTs; returns the count."""
    now = utcnow()
    pending: list[dict[str, Any]] = []
    count = 0
    for row in rows:
        pending.append(
            {
                "batch_id": batch.id,
                "doc_id": row["doc_id"],
                "text": row["text"],
                "meta": row.get("meta") or None,
                "request": row.get("request"),
                "state": JobState.QUEUED.value,
                "attempts": 0,
                "created_at": now,
            }
        )
        if len(pending) >= insert_batch:
            session.execute(insert(Job), pending)
            count += len(pending)
            pending = []
    if pending:
        session.execute(insert(Job), pending)
        count += len(pending)
    batch.total += count
    session.flush()
    return count


def _iter_id_chunks(
    sessions: sessionmaker[Session], batch_id: str, size: int, condition: Callable[[], ColumnElement[bool]]
) -> Iterator[list[int]]:
    """Ids of a batch's jobs matching `condition()` (rebuilt per page), in id order, `size` at a time."""
    last = 0
    while True:
        query = select(Job.id).where(Job.batch_id == batch_id, condition(), Job.id > last)
        with sessions() as session:
            chunk = list(session.scalars(query.order_by(Job.id).limit(size)))
        if not chunk:
            return
        yield chunk
        last = chunk[-1]


def iter_job_id_chunks(
    sessions: sessionmaker[Session],
    batch_id: str,
    size: int,
    states: Iterable[JobState],
    expired_only: bool = False,
) -> Iterator[list[int]]:
    """Ids of a batch's jobs in `states` (`expired_only`: whose lease ran out), `size` at a time."""
    wanted = [s.value for s in states]

    def condition() -> ColumnElement[bool]:
        matches = Job.state.in_(wanted)
        return and_(matches, Job.lease_expires_at < utcnow()) if expired_only else matches

    return _iter_id_chunks(sessions, batch_id, size, condition)


def get_batch(session: Session, batch_id: str) -> Batch:
    """The batch `batch_id`, or `BatchNotFoundError`."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise BatchNotFoundError(f"no batch {batch_id!r} in this database (see `sumfleet batches`)")
    return batch


def list_batches(session: Session, limit: int = 50) -> list[Batch]:
    """The newest batches first."""
    return list(session.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)))


def count_jobs(session: Session, batch_id: str) -> BatchCounts:
    """Jobs of a batch per state, in one query."""
    rows = session.execute(select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state)).all()
    return BatchCounts({state: n for state, n in rows})


def _claimable(now: datetime, worker: str | None = None) -> ColumnElement[bool]:
    """Queued jobs, running jobs whose lease ran out (the worker died or hung), and `worker`'s own."""
    queued, running = moves(JobState.RUNNING, JobState.QUEUED, JobState.RUNNING)
    taken_over = Job.lease_expires_at < now if worker is None else or_(Job.lease_expires_at < now, Job.worker == worker)
    return or_(Job.state == queued, and_(Job.state == running, taken_over))


def give_up_exhausted(session: Session, job_ids: Sequence[int], max_attempts: int) -> int:
    """Fail the jobs among `job_ids` that lost their worker `max_attempts` times already."""
    now = utcnow()
    return rowcount(
        session.execute(
            update(Job)
            .where(
                Job.id.in_(list(job_ids)),
                Job.state.in_(moves(JobState.FAILED, JobState.RUNNING)),
                Job.lease_expires_at < now,
                Job.attempts >= max_attempts,
            )
            .values(
                state=JobState.FAILED.value,
                error=f"gave up after {max_attempts} attempts: the worker process died or ran out of time "
                "on this document each time",
                finished_at=now,
                lease_expires_at=None,
            ),
            execution_options={"synchronize_session": False},
        )
    )


def claim_jobs(session: Session, job_ids: Sequence[int], worker: str, lease_seconds: float = 3600) -> list[ClaimedJob]:
    """Mark the claimable jobs among `job_ids` running for `worker` and return them (one query).

    Finished, cancelled and validly leased jobs are skipped, so a redelivered chunk only
    redoes what is left and never races a live worker; a worker may re-claim its own jobs
    (it retries a chunk after losing the database). The lease outlives the task time limit.
    """
    now = utcnow()
    statement = (
        update(Job)
        .where(Job.id.in_(list(job_ids)), _claimable(now, worker))
        .values(
            state=JobState.RUNNING.value,
            worker=worker,
            attempts=Job.attempts + 1,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
        )
        .returning(Job.id, Job.doc_id, Job.text, Job.attempts, Job.request)
    )
    rows = session.execute(statement, execution_options={"synchronize_session": False}).all()
    return sorted((ClaimedJob(*row) for row in rows), key=lambda job: job.id)


def add_attempts(session: Session, job_ids: Sequence[int], delta: int, worker: str) -> None:
    """Change the attempt count of jobs `worker` holds (isolation mode counts one document at a time)."""
    session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.worker == worker, Job.state == JobState.RUNNING.value)
        .values(attempts=Job.attempts + delta),
        execution_options={"synchronize_session": False},
    )


def release_jobs(session: Session, job_ids: Sequence[int], worker: str) -> list[int]:
    """Give back jobs `worker` claimed but did not start (a graceful stop): queued again, attempt undone."""
    rows = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.worker == worker, Job.state.in_(moves(JobState.QUEUED, JobState.RUNNING)))
        .values(state=JobState.QUEUED.value, attempts=Job.attempts - 1, lease_expires_at=None, started_at=None)
        .returning(Job.id),
        execution_options={"synchronize_session": False},
    ).all()
    return sorted(row[0] for row in rows)


def iter_claimable_chunks(sessions: sessionmaker[Session], batch_id: str, size: int) -> Iterator[list[int]]:
    """Ids of a batch's claimable jobs (queued, or running on an expired lease), `size` at a time."""
    return _iter_id_chunks(sessions, batch_id, size, lambda: _claimable(utcnow()))


def mark_published(session: Session, batch_id: str) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(published_at=utcnow()))


def unfinished_batches(session: Session) -> list[tuple[str, str, datetime | None]]:
    """(id, queue, published_at) of every batch still queued or running."""
    rows = session.execute(
        select(Batch.id, Batch.queue, Batch.published_at).where(
            Batch.state.in_([BatchState.QUEUED.value, BatchState.RUNNING.value])
        )
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def count_expired(session: Session, batch_id: str) -> int:
    """Running jobs of a batch whose lease ran out."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == batch_id, Job.state == JobState.RUNNING.value, Job.lease_expires_at < utcnow())
        )
        or 0
    )


def finish_jobs(session: Session, outcomes: Sequence[JobOutcome], worker: str) -> int:
    """Write outcomes of jobs `worker` holds; others are left alone. Returns rows written."""
    if not outcomes:
        return 0
    now = utcnow()
    statement = (
        update(Job)
        .where(
            Job.id == bindparam("b_id"),
            Job.state == _FINISHED_FROM,
            Job.worker == bindparam("b_worker"),
        )
        .values(
            state=bindparam("b_state"),
            summary=bindparam("b_summary"),
            error=bindparam("b_error"),
            prompt_variant=bindparam("b_variant"),
            prompt_tokens=bindparam("b_prompt_tokens"),
            output_tokens=bindparam("b_output_tokens"),
            generation_seconds=bindparam("b_seconds"),
            pieces=bindparam("b_pieces"),
            levels=bindparam("b_levels"),
            finished_at=now,
            lease_expires_at=None,
        )
    )
    params = [
        {
            "b_id": o.job_id,
            "b_worker": worker,
            "b_state": o.state.value,
            "b_summary": o.summary,
            "b_error": o.error,
            "b_variant": o.prompt_variant,
            "b_prompt_tokens": o.prompt_tokens,
            "b_output_tokens": o.output_tokens,
            "b_seconds": o.generation_seconds,
            "b_pieces": o.pieces,
            "b_levels": o.levels,
        }
        for o in outcomes
    ]
    result = session.connection().execute(statement, params)
    return result.rowcount


def mark_batch_started(session: Session, batch_id: str) -> None:
    """queued -> running, once, when its first chunk starts."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_([s.value for s in batch_sources_for(BatchState.RUNNING)]))
        .values(state=BatchState.RUNNING.value, started_at=utcnow())
    )


def close_batch_if_done(session: Session, batch_id: str) -> bool:
    """Mark the batch completed when none of its jobs is left unfinished; True if it is done."""
    unfinished = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.state.in_([state.value for state in UNFINISHED_JOB_STATES]))
    )
    if unfinished:
        return False
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_([s.value for s in batch_sources_for(BatchState.COMPLETED)]))
        .values(state=BatchState.COMPLETED.value, finished_at=utcnow())
    )
    return True


def iter_results(session: Session, batch_id: str, page: int = 1000, with_text: bool = False) -> Iterator[Job]:
    """Every job of a batch in id order, streamed `page` rows at a time (bounded memory)."""
    last = 0
    while True:
        rows = list(
            session.scalars(
                select(Job)
                .options(*([] if with_text else [defer(Job.text)]))
                .where(Job.batch_id == batch_id, Job.id > last)
                .order_by(Job.id)
                .limit(page)
            )
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].id
        session.expunge_all()


def cancel_batch(session: Session, batch_id: str) -> tuple[int, int]:
    """Cancel a batch's queued jobs and mark it cancelled; returns (cancelled, still running).

    Running jobs finish and keep their results; a chunk delivered later skips cancelled jobs.
    """
    batch = get_batch(session, batch_id)
    if BatchState(batch.state) not in batch_sources_for(BatchState.CANCELLED):
        raise InvalidTransition(f"batch {batch_id} has already ended ({batch.state}); nothing to cancel")
    now = utcnow()
    cancelled = rowcount(
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.state.in_(moves(JobState.CANCELLED, JobState.QUEUED)))
            .values(state=JobState.CANCELLED.value, finished_at=now),
            execution_options={"synchronize_session": False},
        )
    )
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_([s.value for s in batch_sources_for(BatchState.CANCELLED)]))
        .values(state=BatchState.CANCELLED.value, finished_at=now),
        execution_options={"synchronize_session": False},
    )
    running = count_jobs(session, batch_id)[JobState.RUNNING]
    return cancelled, running
