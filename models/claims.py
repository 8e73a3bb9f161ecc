"""The worker's writes to jobs: claim a chunk's jobs, count attempts, give jobs back, write outcomes.

Each is a few statements whatever the chunk's size, conditional on the job's state and
worker, and moves the batch's counters in the same transaction. Writes that finish a job are
conditional (`WHERE state = 'running' AND worker = me`), so a chunk delivered twice can never
write a second result.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Integer, String, Text, cast, column, exists, or_, update, values
from sqlalchemy.orm import Session

from models.counters import count_moved, count_moves
from models.states import BatchState, JobState, moves
from models.store import close_batch_if_done, utcnow
from models.tables import Batch, Job


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
    finish_reason: str | None = None  # of the final summary: "stop" (the model ended it), "length" (the limit)
    warnings: list[str] | None = None  # quality warnings on the output (models.quality); None: not checked

    @property
    def state(self) -> JobState:
        return JobState.FAILED if self.error is not None else JobState.SUCCEEDED


_CLAIMED = (Job.id, Job.batch_id, Job.doc_id, Job.text, Job.attempts, Job.request)


def claim_jobs(session: Session, job_ids: Sequence[int], worker: str, lease_seconds: float = 3600) -> list[ClaimedJob]:
    """Mark the claimable jobs among `job_ids` running for `worker` and return them (two statements).

    Claimable: running jobs whose lease ran out (their worker died or hung) or that `worker`
    holds already (it retries a chunk after losing the database), then queued jobs. Finished,
    cancelled and validly leased jobs are skipped, so a redelivered chunk only redoes what is
    left and never races a live worker. The lease outlives the task time limit.
    """
    now = utcnow()
    claim = {
        "state": JobState.RUNNING.value,
        "worker": worker,
        "attempts": Job.attempts + 1,
        "started_at": now,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
    }
    ids = list(job_ids)
    options = {"synchronize_session": False}
    taken_over = session.execute(  # first: the second statement makes its rows `worker`'s own
        update(Job)
        .where(
            Job.id.in_(ids),
            Job.state.in_(moves(JobState.RUNNING, JobState.RUNNING)),
            or_(Job.lease_expires_at < now, Job.worker == worker),
        )
        .values(claim)
        .returning(*_CLAIMED),
        execution_options=options,
    ).all()
    queued = session.execute(
        update(Job)
        .where(Job.id.in_(ids), Job.state.in_(moves(JobState.RUNNING, JobState.QUEUED)))
        .values(claim)
        .returning(*_CLAIMED),
        execution_options=options,
    ).all()
    count_moved(session, (row.batch_id for row in queued), JobState.QUEUED, JobState.RUNNING)
    claimed = [ClaimedJob(row.id, row.doc_id, row.text, row.attempts, row.request) for row in [*taken_over, *queued]]
    return sorted(claimed, key=lambda job: job.id)


def gave_up_reason(max_attempts: int) -> str:
    """The error of a job whose worker died on it `max_attempts` times (a poison document)."""
    return (
        f"gave up after {max_attempts} attempts: the worker process died or ran out of time on this document each time"
    )


def give_up_exhausted(session: Session, job_ids: Sequence[int], max_attempts: int) -> int:
    """Fail the jobs among `job_ids` that lost their worker `max_attempts` times already."""
    now = utcnow()
    failed = session.execute(
        update(Job)
        .where(
            Job.id.in_(list(job_ids)),
            Job.state.in_(moves(JobState.FAILED, JobState.RUNNING)),
            Job.lease_expires_at < now,
            Job.attempts >= max_attempts,
        )
        .values(
            state=JobState.FAILED.value,
            error=gave_up_reason(max_attempts),
            finished_at=now,
            lease_expires_at=None,
        )
        .returning(Job.batch_id),
        execution_options={"synchronize_session": False},
    ).scalars()
    batch_ids = list(failed)
    count_moved(session, batch_ids, JobState.RUNNING, JobState.FAILED)
    return len(batch_ids)


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
        .returning(Job.id, Job.batch_id),
        execution_options={"synchronize_session": False},
    ).all()
    count_moved(session, (row.batch_id for row in rows), JobState.RUNNING, JobState.QUEUED)
    return sorted(row.id for row in rows)


@dataclass(slots=True)
class Reclaimed:
    """Running jobs taken back from a worker that is gone, by where they went."""

    queued: dict[str, list[int]] = field(default_factory=dict)  # batch id -> job ids queued again, in id order
    failed: int = 0  # used up their attempts: failed with `gave_up_reason`
    cancelled: int = 0  # of a cancelled batch


def reclaim_jobs(
    session: Session, batch_ids: Sequence[str], max_attempts: int, *, worker: str | None = None
) -> Reclaimed:
    """Take back the running jobs of `batch_ids` whose worker is gone: those `worker` holds (a process
    known to be dead), else those whose lease ran out. Three statements, each an index range over the
    batches' running jobs.

    A job of a cancelled batch ends cancelled; one whose worker died on it `max_attempts` times ends
    failed; the others are queued again with their attempts kept (a death counts, so a poison document
    still runs out of attempts) and nobody's lease, so the next delivery of any chunk naming them claims
    them at once. Once queued they are no longer expired: a sweep puts them back on the broker once per
    expiry, not once per sweep.
    """
    now = utcnow()
    ids = list(batch_ids)
    gone = Job.worker == worker if worker is not None else Job.lease_expires_at < now
    of_cancelled_batch = exists().where(Batch.id == Job.batch_id, Batch.state == BatchState.CANCELLED.value)
    options = {"synchronize_session": False}
    reclaimed = Reclaimed()
    if not ids:
        return reclaimed

    def running(target: JobState) -> tuple[Any, ...]:
        return (Job.batch_id.in_(ids), Job.state.in_(moves(target, JobState.RUNNING)), gone)

    cancelled = session.execute(
        update(Job)
        .where(*running(JobState.CANCELLED), of_cancelled_batch)
        .values(state=JobState.CANCELLED.value, finished_at=now, lease_expires_at=None)
        .returning(Job.batch_id),
        execution_options=options,
    ).scalars()
    cancelled_batches = list(cancelled)
    count_moved(session, cancelled_batches, JobState.RUNNING, JobState.CANCELLED)
    failed = session.execute(
        update(Job)
        .where(*running(JobState.FAILED), ~of_cancelled_batch, Job.attempts >= max_attempts)
        .values(state=JobState.FAILED.value, error=gave_up_reason(max_attempts), finished_at=now, lease_expires_at=None)
        .returning(Job.batch_id),
        execution_options=options,
    ).scalars()
    failed_batches = list(failed)
    count_moved(session, failed_batches, JobState.RUNNING, JobState.FAILED)
    queued = session.execute(
        update(Job)
        .where(*running(JobState.QUEUED), ~of_cancelled_batch, Job.attempts < max_attempts)
        .values(state=JobState.QUEUED.value, lease_expires_at=None)
        .returning(Job.id, Job.batch_id),
        execution_options=options,
    ).all()
    count_moved(session, (row.batch_id for row in queued), JobState.RUNNING, JobState.QUEUED)
    for row in sorted(queued, key=lambda row: row.id):
        reclaimed.queued.setdefault(row.batch_id, []).append(row.id)
    reclaimed.failed, reclaimed.cancelled = len(failed_batches), len(cancelled_batches)
    for batch_id in sorted(set(failed_batches)):  # its last open job may just have failed: the batch ends
        close_batch_if_done(session, batch_id)
    return reclaimed


def renew_leases(session: Session, job_ids: Sequence[int], worker: str, lease_seconds: float) -> int:
    """Push the leases of `job_ids` still running under `worker`'s name to now + `lease_seconds`;
    returns how many. A job another worker took over (its lease ran out meanwhile) is left alone."""
    result = session.execute(
        update(Job)
        .where(Job.id.in_(list(job_ids)), Job.worker == worker, Job.state == JobState.RUNNING.value)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)),
        execution_options={"synchronize_session": False},
    )
    return int(getattr(result, "rowcount", 0) or 0)


def cancel_held(session: Session, job_ids: Sequence[int], worker: str) -> int:
    """Cancel jobs `worker` claimed but has not finished, because their batch was cancelled; returns how many."""
    rows = session.execute(
        update(Job)
        .where(
            Job.id.in_(list(job_ids)), Job.worker == worker, Job.state.in_(moves(JobState.CANCELLED, JobState.RUNNING))
        )
        .values(state=JobState.CANCELLED.value, finished_at=utcnow(), lease_expires_at=None)
        .returning(Job.batch_id),
        execution_options={"synchronize_session": False},
    ).scalars()
    batch_ids = list(rows)
    count_moved(session, batch_ids, JobState.RUNNING, JobState.CANCELLED)
    return len(batch_ids)


# an outcome moves a running job to succeeded or failed
(_FINISHED_FROM,) = set(moves(JobState.SUCCEEDED, JobState.RUNNING)) & set(moves(JobState.FAILED, JobState.RUNNING))
_OUTCOME_COLUMNS = (
    column("job_id", BigInteger),
    column("state", String),
    column("summary", Text),
    column("error", Text),
    column("prompt_variant", String),
    column("prompt_tokens", Integer),
    column("output_tokens", Integer),
    column("generation_seconds", Float),
    column("pieces", Integer),
    column("levels", Integer),
    column("finish_reason", String),
    column("warnings", JSON(none_as_null=True)),
)


def finish_jobs(session: Session, outcomes: Sequence[JobOutcome], worker: str) -> int:
    """Write the outcomes of jobs `worker` holds, in one statement; others are left alone. Returns rows written.

    On PostgreSQL one `UPDATE ... FROM (VALUES ...) RETURNING` writes a whole generation batch;
    SQLite (in-process, no round trips) takes one `UPDATE ... RETURNING` per outcome.
    """
    if not outcomes:
        return 0
    now = utcnow()
    rows = [
        (
            o.job_id,
            o.state.value,
            o.summary,
            o.error,
            o.prompt_variant,
            o.prompt_tokens,
            o.output_tokens,
            o.generation_seconds,
            o.pieces,
            o.levels,
            o.finish_reason,
            o.warnings,
        )
        for o in outcomes
    ]
    mine = (Job.state == _FINISHED_FROM, Job.worker == worker)
    written: list[Any] = []
    if session.get_bind().dialect.name == "postgresql":
        given = values(*_OUTCOME_COLUMNS, name="outcome").data(rows)
        typed = {c.name: cast(given.c[c.name], c.type) for c in _OUTCOME_COLUMNS if c.name != "job_id"}
        statement = (
            update(Job)
            .where(Job.id == given.c.job_id, *mine)
            .values(**typed, finished_at=now, lease_expires_at=None)
            .returning(Job.batch_id, Job.state, Job.prompt_tokens, Job.output_tokens)
        )
        written.extend(session.execute(statement, execution_options={"synchronize_session": False}).all())
    else:
        names = [c.name for c in _OUTCOME_COLUMNS]
        for row in rows:
            fields = dict(zip(names[1:], row[1:], strict=True))
            written.extend(
                session.execute(
                    update(Job)
                    .where(Job.id == row[0], *mine)
                    .values(**fields, finished_at=now, lease_expires_at=None)
                    .returning(Job.batch_id, Job.state, Job.prompt_tokens, Job.output_tokens),
                    execution_options={"synchronize_session": False},
                ).all()
            )
    _count_finished(session, written)
    return len(written)


def _count_finished(session: Session, written: Sequence[Any]) -> None:
    """Move the counters of finished jobs (batch id, state, tokens per row) out of running."""
    moved: dict[str, Counter[JobState]] = defaultdict(Counter)
    tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for batch_id, state, prompt, output in written:
        moved[batch_id][JobState(state)] += 1
        if state == JobState.SUCCEEDED.value:
            tokens[batch_id][0] += prompt or 0
            tokens[batch_id][1] += output or 0
    for batch_id, states in moved.items():
        changes = {JobState.RUNNING: -states.total(), **states}
        prompt, output = tokens[batch_id]
        count_moves(session, batch_id, changes, prompt_tokens=prompt, output_tokens=output)
