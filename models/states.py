"""Job and batch states, and the one table of allowed transitions.

Every state change in `models.store` names its source and target states through `moves` (jobs)
or `batch_sources_for` (batches), so an UPDATE can only make a transition this table allows.
"""

from __future__ import annotations

from enum import Enum

from models.errors import InvalidTransition


class JobState(str, Enum):
    """Where one document is. Stored as its string value."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_JOB_STATES


class BatchState(str, Enum):
    """Where a whole submission is. Stored as its string value."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (BatchState.COMPLETED, BatchState.CANCELLED)


FINISHED_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
UNFINISHED_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})

# running -> running is a redelivered chunk taking over a job whose worker died; running ->
# queued a worker stopping gracefully and giving back a job it claimed but did not start.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

BATCH_TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.QUEUED: frozenset({BatchState.RUNNING, BatchState.COMPLETED, BatchState.CANCELLED}),
    BatchState.RUNNING: frozenset({BatchState.COMPLETED, BatchState.CANCELLED}),
    BatchState.COMPLETED: frozenset(),
    BatchState.CANCELLED: frozenset(),
}


def sources_for(target: JobState) -> frozenset[JobState]:
    """The job states from which `target` may be entered (used in conditional UPDATEs)."""
    return frozenset(s for s, allowed in JOB_TRANSITIONS.items() if target in allowed)


def batch_sources_for(target: BatchState) -> frozenset[BatchState]:
    """The batch states from which `target` may be entered."""
    return frozenset(s for s, allowed in BATCH_TRANSITIONS.items() if target in allowed)


def check_job_transition(current: JobState, target: JobState) -> None:
    """Raise `InvalidTransition` unless a job may go from `current` to `target`."""
    if target not in JOB_TRANSITIONS[current]:
        raise InvalidTransition(f"job cannot go from {current.value} to {target.value}")


def moves(target: JobState, *sources: JobState) -> list[str]:
    """The values of `sources` for an UPDATE's `state IN (...)` that moves jobs to `target`;
    raises `InvalidTransition` if the table forbids any of those moves."""
    for source in sources:
        check_job_transition(source, target)
    return [source.value for source in sources]
