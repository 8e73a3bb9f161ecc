"""Tuning runs given to the fleet: created with their examples, claimed by one worker under a lease
that training renews, ended with the adapter they made (or the reason they failed).

A worker acknowledges a tuning message when it takes it (training outlasts any broker timeout);
what keeps a run from being lost is its lease: the sweeper publishes a run again when its lease
ran out, and the next worker resumes from the run's last checkpoint.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.orm import Session

from models.db import rowcount
from models.errors import AdapterError
from models.store import utcnow
from models.tables import TuningExample, TuningRun

UNFINISHED = ("queued", "running")


def create_run(
    session: Session,
    *,
    name: str,
    model: str,
    queue: str,
    config: dict[str, Any],
    prompt: str,
    max_new_tokens: int,
    train: Iterable[tuple[str, str]],
    heldout: Iterable[tuple[str, str]],
) -> TuningRun:
    """A queued run with its examples (training first, then held-out), in the caller's transaction."""
    run = TuningRun(
        id="tune_" + secrets.token_hex(8),
        name=name,
        model=model,
        queue=queue,
        config=config,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        state="queued",
        step=0,
        created_at=utcnow(),
    )
    session.add(run)
    session.flush()
    rows = [
        {"run_id": run.id, "seq": seq, "document": document, "reference": reference, "heldout": held}
        for seq, (document, reference, held) in enumerate(
            [(d, r, False) for d, r in train] + [(d, r, True) for d, r in heldout]
        )
    ]
    for start in range(0, len(rows), 1000):
        session.execute(insert(TuningExample), rows[start : start + 1000])
    return run


def get_run(session: Session, run_id: str) -> TuningRun:
    run = session.get(TuningRun, run_id)
    if run is None:
        raise AdapterError(f"no tuning run {run_id!r} in this database")
    return run


def examples(session: Session, run_id: str, heldout: bool) -> Iterator[tuple[str, str]]:
    """The run's (document, reference) pairs of one kind, in order."""
    query = select(TuningExample.document, TuningExample.reference).where(
        TuningExample.run_id == run_id, TuningExample.heldout == heldout
    )
    for row in session.execute(query.order_by(TuningExample.seq)):
        yield row[0], row[1]


def claim_run(session: Session, run_id: str, worker: str, lease_seconds: float) -> TuningRun | None:
    """Take the run for `worker` (queued, or running on a lease that ran out); None if it is not to be had."""
    now = utcnow()
    taken = rowcount(
        session.execute(
            update(TuningRun)
            .where(
                TuningRun.id == run_id,
                or_(
                    TuningRun.state == "queued",
                    (TuningRun.state == "running") & (TuningRun.lease_expires_at < now),
                ),
            )
            .values(
                state="running",
                worker=worker,
                started_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            ),
            execution_options={"synchronize_session": False},
        )
    )
    return get_run(session, run_id) if taken else None


def progress(
    session: Session, run_id: str, worker: str, step: int, total: int, loss: float, lease_seconds: float
) -> None:
    """Record a step of training and renew the lease (only while `worker` holds the run)."""
    session.execute(
        update(TuningRun)
        .where(TuningRun.id == run_id, TuningRun.worker == worker, TuningRun.state == "running")
        .values(step=step, total_steps=total, loss=loss, lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)),
        execution_options={"synchronize_session": False},
    )


def finish_run(
    session: Session, run_id: str, worker: str, *, adapter: str | None = None, error: str | None = None
) -> None:
    """End the run: completed with the adapter it made, or failed with the reason."""
    session.execute(
        update(TuningRun)
        .where(TuningRun.id == run_id, TuningRun.worker == worker, TuningRun.state == "running")
        .values(
            state="failed" if error else "completed",
            adapter=adapter,
            error=error,
            finished_at=utcnow(),
            lease_expires_at=None,
        ),
        execution_options={"synchronize_session": False},
    )


def requeue_lost(session: Session, now: datetime | None = None) -> list[tuple[str, str]]:
    """Queue again the running runs whose lease ran out (their worker died), once each; (id, queue) of those."""
    rows = session.execute(
        update(TuningRun)
        .where(TuningRun.state == "running", TuningRun.lease_expires_at < (now or utcnow()))
        .values(state="queued", worker=None, lease_expires_at=None)
        .returning(TuningRun.id, TuningRun.queue),
        execution_options={"synchronize_session": False},
    )
    return [(row[0], row[1]) for row in rows]
