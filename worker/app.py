"""The worker's Celery app: the shared app (`models.broker`) plus its one task, and the worker
process's lifetime (the model is loaded once, after fork, in each pool process).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from celery import Celery, Task, signals
from sqlalchemy.exc import InterfaceError, OperationalError

from models import defaults, metrics
from models.adapters import adapter_dir
from models.broker import create_app, queue_for, recovery_queue_for, send_chunk
from models.db import ensure_schema, open_database, session_factory
from models.errors import BatchNotFoundError
from models.registry import WorkerInfo
from models.settings import Settings, hide_password
from worker.chunk import ChunkProcessor
from worker.heartbeat import Heartbeat, beat_on_generate, kill_this_process
from worker.identity import worker_id
from worker.lost import WorkRecovery, request_class
from worker.presence import Presence, describe
from worker.pulling import ChunkPuller

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Runtime:
    """What a worker process holds for its whole life; filled in after fork."""

    processor: ChunkProcessor | None = None
    presence: Presence | None = None


def threads_per_process(settings: Settings, processes: int) -> int:
    """CPU threads for each of a worker's `processes`: SUMFLEET_THREADS, else the cores this
    process may run on divided among them (so `-c 2` on 2 cores runs 2 compute threads, not 4)."""
    if settings.threads:
        return settings.threads
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


def create_worker_app(settings: Settings, model: str, concurrency: int = 1, queue: str | None = None) -> Celery:
    """The app a worker runs: the publishing app plus the task and the per-process model.

    `queue` is the queue the worker consumes; a task whose chunk cannot fill the engine takes
    more chunks from it (`worker.pulling`)."""
    app = create_app(settings)
    runtime = _Runtime()
    stopping = multiprocessing.Event()  # created before the pool forks, so children see it

    @signals.worker_shutting_down.connect(weak=False)
    def _stop(**_: object) -> None:  # SIGTERM/SIGINT in the main process: finish the current batch only
        stopping.set()

    def requeue(batch_id: str, queue: str, job_ids: list[int]) -> None:
        send_chunk(app, batch_id, queue, job_ids)

    @signals.worker_process_init.connect(weak=False)
    def _load(pool_child: bool = True, **_: object) -> None:
        from worker.loading import load_engine

        database = open_database(settings.database_url)
        ensure_schema(database, migrate=False)
        threads = threads_per_process(settings, concurrency)
        started = time.perf_counter()
        engine = load_engine(model, settings.model_copy(update={"threads": threads}))
        metrics.MODEL_LOAD_SECONDS.labels(model).set(time.perf_counter() - started)
        metrics.meter_generation(engine, model)
        sessions = session_factory(database)
        lease = settings.task_time_limit + settings.lease_grace
        # a pool process that stops making progress ends itself and its parent takes its jobs back
        # at once; a solo worker (no parent to do that) stops renewing and lets its leases run out
        heartbeat = Heartbeat(
            sessions, worker_id(), lease_seconds=lease, limit=settings.task_time_limit, on_stall=_stall(pool_child)
        )
        beat_on_generate(engine, heartbeat)
        runtime.processor = ChunkProcessor(
            sessions,
            engine,
            worker_id(),
            lease_seconds=lease,
            max_attempts=settings.max_attempts,
            should_stop=stopping.is_set,
            requeue=requeue,
            adapters=adapter_dir(settings.adapter_dir),
            heartbeat=heartbeat.start(),
        )
        from worker.sweeper import Sweeper

        Sweeper(sessions, app, settings).start()  # in the child: it never forks with a thread running
        device, dtype = describe(engine)
        info = WorkerInfo(runtime.processor.worker, model, queue or queue_for(model), device, dtype)
        runtime.presence = Presence(sessions, info).start()  # the worker registry: `sumfleet workers`
        context = {"worker": runtime.processor.worker, "model": model}
        log.info("worker %s ready with model %s (%d threads)", runtime.processor.worker, model, threads, extra=context)

    # a pool process that dies gives its jobs back at once, through its parent (`worker.lost`)
    chunk_request = request_class(WorkRecovery(settings, app))

    @app.task(name=defaults.TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, Request=chunk_request)
    def summarize_chunk(self: Task, batch_id: str, job_ids: list[int]) -> dict[str, int]:
        if runtime.processor is None:  # solo/threads pools never fork: load on first use
            _load(pool_child=False)
        processor = runtime.processor
        assert processor is not None
        capacity = int(getattr(processor.engine, "capacity", 0) or 0)
        puller = ChunkPuller(app, recovery_queue_for(queue), queue) if queue and capacity > len(job_ids) else None
        groups: dict[str, list[int]] = {batch_id: list(job_ids)}
        messages = {batch_id: 1}
        totals = {"claimed": 0, "succeeded": 0, "failed": 0}
        try:
            for chunk in puller.pull(capacity - len(job_ids)) if puller else []:
                groups.setdefault(chunk.batch_id, []).extend(chunk.job_ids)
                messages[chunk.batch_id] = messages.get(chunk.batch_id, 0) + 1
            for group, ids in groups.items():
                ids = list(dict.fromkeys(ids))  # a republished job may ride in two messages
                if group != batch_id and queue and stopping.is_set():  # not started: published again, then acked
                    requeue(group, queue, ids)
                    continue
                if runtime.presence is not None:
                    runtime.presence.working(group)
                metrics.IN_FLIGHT.labels(model).inc(len(ids))
                try:
                    report = _with_database_retries(partial(processor.process, group, ids), group)
                except BatchNotFoundError:
                    # published by a producer on another database: nothing here to run; that database's
                    # sweepers publish its jobs again for workers that share it
                    log.error(
                        "batch %s is not in this worker's database (%s): the producer that published it uses "
                        "another one; give this worker the same SUMFLEET_DATABASE_URL as submit and the API",
                        group,
                        hide_password(settings.database_url),
                    )
                    continue
                finally:
                    metrics.IN_FLIGHT.labels(model).dec(len(ids))
                metrics.DOCUMENTS.labels(model, "succeeded").inc(report.succeeded)
                metrics.DOCUMENTS.labels(model, "failed").inc(report.failed)
                metrics.DOCUMENTS.labels(model, "cancelled").inc(report.cancelled)
                metrics.PROMPT_TOKENS.labels(model).inc(report.prompt_tokens)
                metrics.OUTPUT_TOKENS.labels(model).inc(report.output_tokens)
                if runtime.presence is not None:
                    runtime.presence.done(report.succeeded + report.failed)
                log.info(
                    "batch %s: %d job(s) of %d chunk(s), ran %d, succeeded %d, failed %d; "
                    "%.2fs generating, %.2fs in the database around it",
                    group,
                    len(ids),
                    messages[group],
                    report.claimed,
                    report.succeeded,
                    report.failed,
                    report.generate_seconds,
                    report.bookkeeping_seconds,
                    extra={"batch_id": group, "worker": processor.worker, "model": model},
                )
                totals["claimed"] += report.claimed
                totals["succeeded"] += report.succeeded
                totals["failed"] += report.failed
            if puller is not None:
                puller.ack_all()  # every pulled chunk's results are committed (or its jobs published again)
        finally:
            if puller is not None:
                puller.close()
            if runtime.presence is not None:
                runtime.presence.working(None)
        return totals

    @app.task(name=defaults.TUNE_TASK_NAME, acks_late=False, time_limit=defaults.TUNE_TIME_LIMIT)
    def tune(run_id: str) -> str | None:
        """Train a tuning run given to the fleet (acked when taken: its lease, renewed at every step,
        is what brings it back if this process dies)."""
        if runtime.processor is None:
            _load(pool_child=False)
        from worker.tuning import run_claimed

        assert runtime.processor is not None
        return run_claimed(runtime.processor.sessions, settings, run_id, runtime.processor.worker)

    return app


def _stall(pool_child: bool) -> Callable[[], None]:
    """What a worker process that makes no progress does: a pool process dies (its parent takes its
    jobs back at once, `worker.lost`); a solo worker's only process stops renewing its leases."""
    if pool_child:
        return kill_this_process
    return lambda: log.error("no progress: this solo worker stops renewing its leases; the sweeper takes them over")


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
