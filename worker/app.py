"""The worker's Celery app: the shared app (`models.broker`) plus its one task, and the worker
process's lifetime (the model is loaded once, after fork, in each pool process).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from celery import Celery, Task, signals
from sqlalchemy.exc import InterfaceError, OperationalError

from models import defaults
from models.broker import create_app, send_chunk
from models.db import ensure_schema, open_database, session_factory
from models.settings import Settings
from worker.chunk import ChunkProcessor
from worker.identity import worker_id

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Runtime:
    """What a worker process holds for its whole life; filled in after fork."""

    processor: ChunkProcessor | None = None


def create_worker_app(settings: Settings, model: str) -> Celery:
    """The app a worker runs: the publishing app plus the task and the per-process model."""
    app = create_app(settings)
    runtime = _Runtime()
    stopping = multiprocessing.Event()  # created before the pool forks, so children see it

    @signals.worker_shutting_down.connect(weak=False)
    def _stop(**_: object) -> None:  # SIGTERM/SIGINT in the main process: finish the current batch only
        stopping.set()

    def requeue(batch_id: str, queue: str, job_ids: list[int]) -> None:
        send_chunk(app, batch_id, queue, job_ids)

    @signals.worker_process_init.connect(weak=False)
    def _load(**_: object) -> None:
        from worker.loading import load_engine

        database = open_database(settings.database_url)
        ensure_schema(database, migrate=False)
        engine = load_engine(model, settings)
        sessions = session_factory(database)
        runtime.processor = ChunkProcessor(
            sessions,
            engine,
            worker_id(),
            lease_seconds=settings.task_time_limit + settings.lease_grace,
            max_attempts=settings.max_attempts,
            should_stop=stopping.is_set,
            requeue=requeue,
        )
        from worker.sweeper import Sweeper

        Sweeper(sessions, app, settings).start()  # in the child: it never forks with a thread running
        log.info("worker %s ready with model %s", runtime.processor.worker, model)

    @app.task(name=defaults.TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def summarize_chunk(self: Task, batch_id: str, job_ids: list[int]) -> dict[str, int]:
        if runtime.processor is None:  # solo/threads pools never fork: load on first use
            _load()
        processor = runtime.processor
        assert processor is not None
        report = _with_database_retries(lambda: processor.process(batch_id, job_ids), batch_id)
        log.info(
            "batch %s: chunk of %d, ran %d, succeeded %d, failed %d",
            batch_id,
            len(job_ids),
            report.claimed,
            report.succeeded,
            report.failed,
        )
        return {"claimed": report.claimed, "succeeded": report.succeeded, "failed": report.failed}

    return app


def _with_database_retries(work: Callable[[], T], batch_id: str) -> T:
    """Run `work`, retrying with backoff while the database is unreachable.

    The chunk's message stays unacknowledged meanwhile (late acks), so if the outage
    outlasts the task time limit, the process is killed and the chunk redelivered; nothing
    is lost. A retry re-claims this process's own jobs and skips the finished ones.
    """
    delay = 1.0
    while True:
        try:
            return work()
        except (OperationalError, InterfaceError) as error:
            reason = (str(getattr(error, "orig", error)).strip().splitlines() or [type(error).__name__])[0]
            log.warning("batch %s: database unreachable (%s); retrying in %.0fs", batch_id, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
