"""Batches: create, find, list, start, close, cancel, prune; and the keyset scans of their jobs.

Job states change here, in `models.claims` (the worker's writes) and in `models.job_writer`
(adding jobs), always through the states table and together with the batch's counters.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session, defer, sessionmaker

from models.counters import Counts, count_moves, counts_of
from models.db import rowcount
from models.errors import BatchNotFoundError, InvalidTransition
from models.states import BatchState, JobState, batch_sources_for, moves
from models.tables import ApiBatch, ApiFile, Batch, Job

PRUNE_PAGE = 10_000  # job rows deleted per transaction by `prune`


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime (SQLite hands back naive ones)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def new_batch_id() -> str:
    """A short random id, safe in URLs, file names and shell variables."""
    return "b" + secrets.token_hex(8)


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


def get_batch(session: Session, batch_id: str) -> Batch:
    """The batch `batch_id`, or `BatchNotFoundError`."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise BatchNotFoundError(f"no batch {batch_id!r} in this database (see `sumfleet batches`)")
    return batch


def list_batches(session: Session, limit: int = 50, before: str | None = None) -> list[Batch]:
    """The newest batches first; `before`: only those created before that batch (the next page)."""
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    if before is not None:
        anchor = get_batch(session, before)
        query = query.where(
            (Batch.created_at < anchor.created_at) | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id))
        )
    return list(session.scalars(query))


def batch_counts(session: Session, batch_id: str) -> Counts:
    """The batch's jobs per state and tokens, from its counters (one row, whatever its size)."""
    return counts_of(get_batch(session, batch_id))


def iter_job_id_chunks(
    sessions: sessionmaker[Session],
    batch_id: str,
    size: int,
    states: Iterable[JobState],
    expired_only: bool = False,
) -> Iterator[list[int]]:
    """Ids of a batch's jobs in `states` (`expired_only`: whose lease ran out), in id order per
    state, `size` at a time. Each page is an index range scan (batch, state, id), never a sort."""
    for state in states:
        last = 0
        while True:
            query = select(Job.id).where(Job.batch_id == batch_id, Job.state == state.value, Job.id > last)
            if expired_only:
                query = query.where(Job.lease_expires_at < utcnow())
            with sessions() as session:
                chunk = list(session.scalars(query.order_by(Job.id).limit(size)))
            if not chunk:
                break
            yield chunk
            last = chunk[-1]


def iter_claimable_chunks(sessions: sessionmaker[Session], batch_id: str, size: int) -> Iterator[list[int]]:
    """Ids of a batch's claimable jobs, `size` at a time: running ones whose lease ran out, then queued ones."""
    yield from iter_job_id_chunks(sessions, batch_id, size, (JobState.RUNNING,), expired_only=True)
    yield from iter_job_id_chunks(sessions, batch_id, size, (JobState.QUEUED,))


def refresh_statistics(session: Session) -> None:
    """Have PostgreSQL re-sample the jobs table (after a bulk insert its statistics lag behind)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE jobs"))


def mark_published(session: Session, batch_id: str) -> datetime:
    """Record that the batch's queued jobs are being put on the broker now; returns that moment
    (its messages carry it, so the sweeper can tell whether the queue has moved past them)."""
    now = utcnow()
    session.execute(update(Batch).where(Batch.id == batch_id).values(published_at=now))
    return now


def unfinished_batches(session: Session) -> list[tuple[str, str, datetime | None]]:
    """(id, queue, published_at) of every batch still queued or running."""
    rows = session.execute(
        select(Batch.id, Batch.queue, Batch.published_at).where(
            Batch.state.in_([BatchState.QUEUED.value, BatchState.RUNNING.value])
        )
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


class OpenBatch(NamedTuple):
    """What the sweeper needs of a batch that still has work to watch over (from its counters)."""

    id: str
    state: str
    queue: str
    published_at: datetime | None
    queued: int
    running: int
    finished: int  # succeeded + failed + cancelled: grows while the batch makes progress
    created_at: datetime  # when it was submitted (committed, before its publish)


def open_batches(session: Session) -> list[OpenBatch]:
    """Batches still queued or running, and cancelled ones that still count queued or running jobs."""
    cancelled = BatchState.CANCELLED.value
    rows = session.execute(
        select(
            Batch.id,
            Batch.state,
            Batch.queue,
            Batch.published_at,
            Batch.jobs_queued,
            Batch.jobs_running,
            Batch.jobs_succeeded + Batch.jobs_failed + Batch.jobs_cancelled,
            Batch.created_at,
        ).where(
            Batch.state.in_([BatchState.QUEUED.value, BatchState.RUNNING.value])
            | ((Batch.state == cancelled) & ((Batch.jobs_queued > 0) | (Batch.jobs_running > 0)))
        )
    ).all()
    return [OpenBatch(*row) for row in rows]


def batches_with_running_jobs(session: Session) -> list[str]:
    """Ids of the batches whose counters show running jobs (the only ones a lost worker can have held)."""
    states = [BatchState.QUEUED.value, BatchState.RUNNING.value, BatchState.CANCELLED.value]
    return list(session.scalars(select(Batch.id).where(Batch.state.in_(states), Batch.jobs_running > 0)))


def batch_state(session: Session, batch_id: str) -> BatchState | None:
    """The batch's state as stored now (None: no such batch), read fresh, never from a cache."""
    state = session.scalar(select(Batch.state).where(Batch.id == batch_id))
    return None if state is None else BatchState(state)


def cancel_unfinished(session: Session, batch_id: str) -> int:
    """Cancel the jobs of a batch that nobody runs: queued ones, and running ones whose lease ran out
    (their worker is gone). Jobs a live worker holds are left to it: it gives them up (cancelled) after
    its current generation batch. Returns the jobs cancelled; counters move with them."""
    now = utcnow()
    options = {"synchronize_session": False}
    # running rows, then queued rows, then the batch row: the order a claim locks them in (no deadlock)
    orphans = rowcount(
        session.execute(
            update(Job)
            .where(
                Job.batch_id == batch_id,
                Job.state.in_(moves(JobState.CANCELLED, JobState.RUNNING)),
                Job.lease_expires_at < now,
            )
            .values(state=JobState.CANCELLED.value, finished_at=now, lease_expires_at=None),
            execution_options=options,
        )
    )
    queued = rowcount(
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.state.in_(moves(JobState.CANCELLED, JobState.QUEUED)))
            .values(state=JobState.CANCELLED.value, finished_at=now),
            execution_options=options,
        )
    )
    count_moves(
        session,
        batch_id,
        {JobState.RUNNING: -orphans, JobState.QUEUED: -queued, JobState.CANCELLED: orphans + queued},
    )
    return orphans + queued


def count_expired(session: Session, batch_id: str) -> int:
    """Running jobs of a batch whose lease ran out (an index range over its running jobs)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.batch_id == batch_id, Job.state == JobState.RUNNING.value, Job.lease_expires_at < utcnow())
        )
        or 0
    )


def mark_batch_started(session: Session, batch_id: str) -> None:
    """queued -> running, once, when its first chunk starts."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_([s.value for s in batch_sources_for(BatchState.RUNNING)]))
        .values(state=BatchState.RUNNING.value, started_at=utcnow())
    )


def close_batch_if_done(session: Session, batch_id: str) -> bool:
    """Mark the batch completed when its counters show no job queued or running; True if it ended now."""
    return (
        rowcount(
            session.execute(
                update(Batch)
                .where(
                    Batch.id == batch_id,
                    Batch.state.in_([s.value for s in batch_sources_for(BatchState.COMPLETED)]),
                    Batch.jobs_queued == 0,
                    Batch.jobs_running == 0,
                )
                .values(state=BatchState.COMPLETED.value, finished_at=utcnow()),
                execution_options={"synchronize_session": False},
            )
        )
        == 1
    )


def iter_results(session: Session, batch_id: str, page: int = 1000, with_text: bool = False) -> Iterator[Job]:
    """Every job of a batch in id order, streamed `page` rows at a time (bounded memory, index (batch, id))."""
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
    """Cancel a batch: its queued jobs and those a dead worker held (lease run out) end cancelled at
    once, and it is marked cancelled; returns (cancelled, still running).

    A live worker finishes the generation batch it is in, then sees the batch cancelled and gives up
    the rest of its claimed jobs as cancelled; a worker that dies meanwhile leaves its jobs to the
    sweeper (or its parent process), which cancels them. Finished results are kept; a chunk
    delivered later claims nothing of a cancelled batch.
    """
    batch = get_batch(session, batch_id)
    if BatchState(batch.state) not in batch_sources_for(BatchState.CANCELLED):
        raise InvalidTransition(f"batch {batch_id} has already ended ({batch.state}); nothing to cancel")
    cancelled = cancel_unfinished(session, batch_id)  # jobs first, then the batch row: the order claims lock in
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_([s.value for s in batch_sources_for(BatchState.CANCELLED)]))
        .values(state=BatchState.CANCELLED.value, finished_at=utcnow()),
        execution_options={"synchronize_session": False},
    )
    session.refresh(batch)
    return cancelled, counts_of(batch)[JobState.RUNNING]


def finished_batches_before(session: Session, moment: datetime, limit: int = 1000) -> list[str]:
    """Ids of batches that ended (completed or cancelled) before `moment`, oldest first."""
    ended = [state.value for state in BatchState if state.finished]
    return list(
        session.scalars(
            select(Batch.id)
            .where(Batch.state.in_(ended), Batch.finished_at < moment)
            .order_by(Batch.finished_at)
            .limit(limit)
        )
    )


def prune_batch(sessions: sessionmaker[Session], batch_id: str, page: int = PRUNE_PAGE) -> int:
    """Delete an ended batch and its jobs, `page` jobs per transaction (no long lock, no huge undo);
    returns the jobs deleted."""
    with sessions() as session:
        state = get_batch(session, batch_id).state
    if not BatchState(state).finished:
        raise InvalidTransition(f"batch {batch_id} is still {state}: only ended batches are pruned")
    deleted = 0
    while True:
        with sessions.begin() as session:
            ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id).limit(page)))
            if not ids:
                # its HTTP API records go too (with their generated files, rejections and webhooks)
                records = list(session.scalars(select(ApiBatch.id).where(ApiBatch.batch_id == batch_id)))
                if records:
                    session.execute(delete(ApiFile).where(ApiFile.api_batch_id.in_(records)))
                    session.execute(delete(ApiBatch).where(ApiBatch.id.in_(records)))
                session.execute(delete(Batch).where(Batch.id == batch_id))
                return deleted
            deleted += rowcount(session.execute(delete(Job).where(Job.id.in_(ids))))


def prune_finished(
    sessions: sessionmaker[Session], before: datetime, max_batches: int | None = None
) -> tuple[int, int]:
    """Delete batches that ended before `before` (at most `max_batches`), each in bounded
    transactions; returns (batches, jobs) deleted."""
    batches = jobs = 0
    while max_batches is None or batches < max_batches:
        with sessions() as session:
            ended = finished_batches_before(session, before, limit=max_batches or 1000)
        if not ended:
            break
        for batch_id in ended[: None if max_batches is None else max_batches - batches]:
            jobs += prune_batch(sessions, batch_id)
            batches += 1
    return batches, jobs
