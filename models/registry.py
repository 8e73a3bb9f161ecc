"""The worker registry: every worker process records itself and beats every few seconds, so
operators (`sumfleet workers`) and producers (a batch whose model no live worker serves) can see
the fleet without asking the broker."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib.metadata import PackageNotFoundError, version

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from models import defaults
from models.broker import queue_for
from models.db import rowcount
from models.store import as_utc, utcnow
from models.tables import WorkerRecord


def sumfleet_version() -> str:
    try:
        return version("sumfleet")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker process says about itself when it starts."""

    id: str  # host:pid, the same as jobs.worker
    model: str
    queue: str
    device: str | None = None
    dtype: str | None = None

    @property
    def host(self) -> str:
        return self.id.rsplit(":", 1)[0]

    @property
    def pid(self) -> int:
        return int(self.id.rsplit(":", 1)[1])


def this_process(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


def register(session: Session, info: WorkerInfo) -> None:
    """Record a starting worker process (a record left by an earlier process with the same id goes)."""
    now = utcnow()
    session.execute(delete(WorkerRecord).where(WorkerRecord.id == info.id))
    session.add(
        WorkerRecord(
            id=info.id,
            host=info.host,
            pid=info.pid,
            model=info.model,
            queue=info.queue,
            device=info.device,
            dtype=info.dtype,
            version=sumfleet_version(),
            started_at=now,
            heartbeat_at=now,
            documents=0,
        )
    )


def heartbeat(session: Session, worker_id: str, documents: int, current_batch: str | None) -> None:
    """The process is alive: its documents so far and the batch it works on (None: idle)."""
    session.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id)
        .values(heartbeat_at=utcnow(), documents=documents, current_batch=current_batch)
    )


def stopped(session: Session, worker_id: str) -> None:
    session.execute(
        update(WorkerRecord).where(WorkerRecord.id == worker_id).values(stopped_at=utcnow(), current_batch=None)
    )


def is_live(record: WorkerRecord, now: datetime, stale_after: float = defaults.WORKER_STALE_AFTER) -> bool:
    return record.stopped_at is None and now - as_utc(record.heartbeat_at) <= timedelta(seconds=stale_after)


def workers(session: Session) -> list[WorkerRecord]:
    """Every recorded worker process, live or not, newest heartbeat first."""
    return list(session.scalars(select(WorkerRecord).order_by(WorkerRecord.heartbeat_at.desc(), WorkerRecord.id)))


def live_on(session: Session, queue: str, stale_after: float = defaults.WORKER_STALE_AFTER) -> int:
    """How many live worker processes consume `queue`."""
    since = utcnow() - timedelta(seconds=stale_after)
    found = session.scalars(
        select(WorkerRecord.id).where(
            WorkerRecord.queue == queue, WorkerRecord.heartbeat_at >= since, WorkerRecord.stopped_at.is_(None)
        )
    )
    return len(list(found))


def nobody_serves(model: str, queue: str) -> str:
    """The warning, in words, for a batch whose queue no live worker consumes."""
    start = f"sumfleet worker --model {model}" + ("" if queue == queue_for(model) else f" --queue {queue}")
    return f"no live worker serves model {model} (queue {queue}); start one: {start}"


def prune_stale(session: Session, older_than: float = 7 * 24 * 3600) -> int:
    """Forget worker records whose last heartbeat is older than `older_than` seconds."""
    since = utcnow() - timedelta(seconds=older_than)
    return rowcount(session.execute(delete(WorkerRecord).where(WorkerRecord.heartbeat_at < since)))
