"""The worker's writes to jobs: claim a chunk's jobs, count attempts, give jobs back, write outcomes.

Each is a few statements whatever the chunk's size, conditional on the job's state and
worker, and moves the batch's counters in the same transaction. Writes that finish a job are
conditional (`WHERE state = 'running' AND worker = me`), so a chunk delivered twice can never
write a second result.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, Text, cast, column, or_, update, values
from sqlalchemy.orm import Session

from models.counters import count_moved, count_moves
from models.states import JobState, moves
from models.store import utcnow
from models.tables import Job


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
            error=f"gave up after {max_attempts} attempts: the worker process died or ran out of time "
            "on this document each time",
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
