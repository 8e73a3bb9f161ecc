"""A batch's counters: its jobs per state and the tokens of its succeeded jobs, kept on the batch row.

Every change of a job's state changes these in the same transaction (`models.store` calls
`count_moves`), so closing a batch, `status`, `batches` and the API read one row and never
scan the batch's jobs. `recount` is the slow truth they are checked against (`sumfleet status
--verify`, and the tests).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.states import JobState
from models.tables import Batch, Job

COLUMNS = {state: f"jobs_{state.value}" for state in JobState}  # the counter of each job state


@dataclass(frozen=True, slots=True)
class Counts:
    """A batch's jobs per state (states with no job left out) and its succeeded jobs' tokens."""

    by_state: dict[str, int]
    prompt_tokens: int = 0
    output_tokens: int = 0

    def __getitem__(self, state: JobState) -> int:
        return self.by_state.get(state.value, 0)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    @property
    def unfinished(self) -> int:
        return self[JobState.QUEUED] + self[JobState.RUNNING]


def counts_of(batch: Batch) -> Counts:
    """The counters of a loaded batch row."""
    by_state = {state.value: n for state, column in COLUMNS.items() if (n := getattr(batch, column))}
    return Counts(by_state, batch.tokens_prompt, batch.tokens_output)


def count_moves(
    session: Session,
    batch_id: str,
    changes: Mapping[JobState, int],
    *,
    prompt_tokens: int = 0,
    output_tokens: int = 0,
) -> None:
    """Add `changes` (state -> delta) and tokens to the batch's counters, in the caller's transaction."""
    values = {COLUMNS[state]: getattr(Batch, COLUMNS[state]) + delta for state, delta in changes.items() if delta}
    if prompt_tokens:
        values["tokens_prompt"] = Batch.tokens_prompt + prompt_tokens
    if output_tokens:
        values["tokens_output"] = Batch.tokens_output + output_tokens
    if values:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(values), execution_options={"synchronize_session": False}
        )


def count_moved(session: Session, batch_ids: Iterable[str], source: JobState, target: JobState) -> None:
    """Count one move from `source` to `target` per entry of `batch_ids` (the batch of each job moved)."""
    for batch_id, n in Counter(batch_ids).items():
        count_moves(session, batch_id, {source: -n, target: n})


def recount(session: Session, batch_id: str) -> Counts:
    """The counters as a scan of the batch's jobs gives them (slow on a large batch: checks only)."""
    rows = session.execute(select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state))
    by_state = {state: n for state, n in rows}
    prompt, output = session.execute(
        select(func.coalesce(func.sum(Job.prompt_tokens), 0), func.coalesce(func.sum(Job.output_tokens), 0)).where(
            Job.batch_id == batch_id, Job.state == JobState.SUCCEEDED.value
        )
    ).one()
    return Counts(by_state, int(prompt or 0), int(output or 0))


def differences(kept: Counts, counted: Counts) -> list[str]:
    """What the kept counters get wrong against a recount, one line each (empty when they agree)."""
    wrong = [
        f"{state.value}: counter {kept[state]}, jobs {counted[state]}"
        for state in JobState
        if kept[state] != counted[state]
    ]
    for name in ("prompt_tokens", "output_tokens"):
        if getattr(kept, name) != getattr(counted, name):
            wrong.append(f"{name}: counter {getattr(kept, name)}, jobs {getattr(counted, name)}")
    return wrong


def repair(session: Session, batch_id: str, counted: Counts) -> None:
    """Set the batch's counters to `counted` (after `differences` found them wrong)."""
    values: dict[str, int] = {COLUMNS[state]: counted[state] for state in JobState}
    values |= {"tokens_prompt": counted.prompt_tokens, "tokens_output": counted.output_tokens}
    session.execute(update(Batch).where(Batch.id == batch_id).values(values))
