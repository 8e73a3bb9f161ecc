"""A pool process that dies (SIGKILL, the kernel's OOM killer, a segfault) gives its work back at once.

The worker's parent process learns of the death from its pool: billiard reports the dead child
and, a few seconds later (its `lost_worker_timeout`), fails the task it was running with
`WorkerLostError`. Celery would then put the chunk message back at the end of the queue
(`task_reject_on_worker_lost`), where its redelivery found the jobs still leased to the dead
process and did nothing until the lease ran out (task time limit + grace: 31 minutes by default).

Instead, the task's request class here takes the dead process's jobs back in the database first
(jobs record `host:pid`, the parent knows the pid): queued again with the death counted, failed if
that was their last attempt, cancelled if their batch was cancelled (`models.claims.reclaim_jobs`).
It publishes the queued ones to the recovery queue, which every worker of the queue consumes before
new work, and acknowledges the message. This covers the chunks the process had pulled besides
its own (`worker.pulling`). If the database or the broker cannot be reached, Celery's own
handling runs as before (the message goes back; leases and the sweeper do the rest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import WorkerLostError
from celery.worker.request import Request
from celery.worker.state import task_ready
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from models.broker import republish_jobs
from models.claims import reclaim_jobs
from models.db import open_database, session_factory
from models.metrics import process_exited
from models.settings import Settings
from models.store import batches_with_running_jobs
from worker.identity import worker_id

log = logging.getLogger(__name__)


class WorkRecovery:
    """Takes back the jobs of a dead pool process and publishes them first in line; True when done."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app

    def _database(self) -> Engine:
        """A pool that keeps no connection open: the parent forks new pool processes, which must not
        inherit a live database socket."""
        url = self.settings.database_url
        if url.startswith("sqlite"):
            return open_database(url)
        return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})

    def __call__(self, pid: int) -> bool:
        dead = worker_id(pid)
        process_exited(pid)  # its live gauges (documents in flight) stop counting
        database = self._database()
        try:
            sessions = session_factory(database)
            with sessions.begin() as session:
                reclaimed = reclaim_jobs(
                    session, batches_with_running_jobs(session), self.settings.max_attempts, worker=dead
                )
            for batch_id, job_ids in reclaimed.queued.items():
                chunks = republish_jobs(self.app, sessions, batch_id, job_ids, self.settings.chunk_size)
                log.warning(
                    "worker process %s died: republished %d job(s) of batch %s in %d chunk(s), first in line",
                    dead,
                    len(job_ids),
                    batch_id,
                    chunks,
                )
        except Exception as error:  # never let the parent fall over: Celery's requeue and the leases remain
            log.warning(
                "worker process %s died; could not take its jobs back at once (%s: %s); their leases will",
                dead,
                type(error).__name__,
                (str(error).strip().splitlines() or [""])[0],
            )
            return False
        finally:
            database.dispose()
        if reclaimed.failed:
            log.warning("worker process %s died: %d job(s) used up their attempts and failed", dead, reclaimed.failed)
        if reclaimed.cancelled:
            log.warning("worker process %s died: %d job(s) of cancelled batches cancelled", dead, reclaimed.cancelled)
        return True


def request_class(recover: Callable[[int], bool]) -> type[Request]:
    """The chunk task's request class: a lost pool process gives its jobs back through `recover`
    (called with its pid in the parent process); the message is then acknowledged, not requeued."""

    class ChunkRequest(Request):
        def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
            error = exc_info.exception
            error = getattr(error, "exc", error)  # billiard may wrap it in an ExceptionWithTraceback
            pid = self.worker_pid
            if isinstance(error, WorkerLostError) and pid and recover(pid):
                task_ready(self)  # what Celery's own failure handling does first: the request is over
                self.acknowledge()  # its jobs are queued again and published: the message is done with
                return None
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    return ChunkRequest
