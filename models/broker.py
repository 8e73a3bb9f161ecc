"""The contract between producer and worker: the Celery app both use, queue names, the chunk
message, and publishing it. Messages carry job ids only, never document text (claim-check).

Reliability settings: late acks, reject on worker lost, prefetch 1, JSON only, and a Redis
visibility timeout longer than the task time limit (settings refuse otherwise), so a chunk is
never redelivered while it still runs and never lost when its worker dies.

Work taken back from a dead worker, or published again after the broker lost it, goes to the
queue's recovery queue (`recovery_queue_for`). Workers consume it before their queue (the
transport's `priority` queue order: each fetch tries the queues in the order given), so
recovered work runs before new work instead of waiting behind it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.errors import BrokerError, InvalidTransition
from models.settings import Settings, hide_password
from models.states import BatchState, JobState
from models.store import get_batch, iter_claimable_chunks, iter_job_id_chunks, mark_published, refresh_statistics

RECOVERY_SUFFIX = ":recovery"  # a queue name of `queue_for` never holds ":", so no model's queue is a recovery queue
# message header: when the publish that sent the message began (Unix seconds; the batch's published_at)
PUBLISHED_HEADER = "sumfleet_published"


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from `settings`: the producer publishes with it, workers add the task."""
    app = Celery("sumfleet", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # no time limit per chunk: a worker process that makes no generation progress for
        # SUMFLEET_TASK_TIME_LIMIT seconds ends itself (`worker.heartbeat`), however long its chunk runs
        task_time_limit=None,
        # "priority": a worker's every fetch tries its queues in the order given (recovery queue first);
        # kombu's default round robin would let new work alternate with recovered work
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        worker_proc_alive_timeout=900,  # the model loads in the child before it reports up
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=None,
        task_default_queue=defaults.QUEUE_PREFIX,
    )
    return app


def queue_for(model: str) -> str:
    """The queue a model's chunks go to: one queue per model, so workers serve one model each."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.strip()).strip("-").lower() or "default"
    return f"{defaults.QUEUE_PREFIX}.{slug}"


def recovery_queue_for(queue: str) -> str:
    """Where work of `queue` goes when it is published again (a dead worker's, lost messages): the
    workers of `queue` consume it first."""
    return f"{queue}{RECOVERY_SUFFIX}"


def tune_queue_for(model: str) -> str:
    """The queue a model's tuning runs go to (workers started with `--tune` consume it)."""
    return queue_for(model).replace(f"{defaults.QUEUE_PREFIX}.", f"{defaults.QUEUE_PREFIX}.tune.", 1)


def send_tuning(app: Celery, run_id: str, queue: str) -> None:
    """Put a tuning run on its queue: the task `TUNE_TASK_NAME` with the run's id."""
    app.send_task(defaults.TUNE_TASK_NAME, args=[run_id], queue=queue)


def send_chunk(
    app: Celery, batch_id: str, queue: str, job_ids: list[int], producer: Any = None, published: float | None = None
) -> None:
    """Put one chunk message on `queue`: the task `TASK_NAME` with (batch id, job ids), stamped with
    `published` (the publish's start, the batch's `published_at`; default now) in `PUBLISHED_HEADER`."""
    headers = {PUBLISHED_HEADER: time.time() if published is None else published}
    app.send_task(defaults.TASK_NAME, args=[batch_id, job_ids], queue=queue, producer=producer, headers=headers)


def published_stamp(raw: bytes | str) -> float | None:
    """The `PUBLISHED_HEADER` of a message as the Redis transport stores it (None: not stamped)."""
    try:
        stamp = json.loads(raw)["headers"][PUBLISHED_HEADER]
        return float(stamp)
    except (ValueError, TypeError, KeyError):
        return None


def check_broker(app: Celery) -> None:
    """Fail fast, with the URL in the message, when the broker does not answer."""
    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, timeout=5)
    except Exception as error:  # kombu wraps socket errors in several types
        raise BrokerError(
            f"cannot reach the broker at {hide_password(url)}: {error} (set SUMFLEET_BROKER_URL)"
        ) from None


def chunk_size_for(total: int, setting: int | None = None) -> int:
    """Job ids per chunk message for a batch of `total` jobs: `setting` (SUMFLEET_CHUNK_SIZE) when
    given, else about CHUNKS_PER_BATCH chunks of CHUNK_SIZE_MIN to CHUNK_SIZE_MAX ids."""
    if setting:
        return setting
    return max(defaults.CHUNK_SIZE_MIN, min(defaults.CHUNK_SIZE_MAX, -(-total // defaults.CHUNKS_PER_BATCH)))


def publish_batch(
    app: Celery,
    sessions: sessionmaker[Session],
    batch_id: str,
    chunk_size: int | None = None,
    only_expired: bool = False,
    recovery: bool = False,
) -> int:
    """Publish the batch's claimable jobs (queued, or running on an expired lease) as chunk messages,
    all over one producer connection. `chunk_size` None sizes chunks by the batch
    (`chunk_size_for`); `only_expired` publishes just the running jobs whose worker died;
    `recovery` publishes to the batch's recovery queue, ahead of new work. A batch that has ended
    (completed, cancelled) is refused with `InvalidTransition` naming its state. Returns the chunk count.
    """
    stamp = time.time()
    with sessions.begin() as session:
        batch = get_batch(session, batch_id)
        if BatchState(batch.state).finished:
            raise InvalidTransition(
                f"batch {batch_id} has already ended ({batch.state}); its jobs are not published again"
            )
        # the size the batch was submitted with wins over the publisher's own setting
        queue, chunk_size = batch.queue, chunk_size_for(batch.total, batch.params.get("chunk_size") or chunk_size)
        if not only_expired:
            stamp = mark_published(session, batch_id).timestamp()
            if batch.total >= defaults.ANALYZE_AFTER:
                refresh_statistics(session)  # just bulk-inserted: keep the planner on the keyset index
    ids = (
        iter_job_id_chunks(sessions, batch_id, chunk_size, (JobState.RUNNING,), expired_only=True)
        if only_expired
        else iter_claimable_chunks(sessions, batch_id, chunk_size)
    )
    return _send_chunks(app, batch_id, recovery_queue_for(queue) if recovery else queue, ids, stamp)


def republish_jobs(
    app: Celery, sessions: sessionmaker[Session], batch_id: str, job_ids: list[int], chunk_size: int | None = None
) -> int:
    """Publish these jobs of a batch again, first in line (its recovery queue), in chunks of the
    batch's size, over a connection of their own; the batch counts as published now. Returns the chunk count."""
    with sessions.begin() as session:
        batch = get_batch(session, batch_id)
        queue, size = batch.queue, chunk_size_for(batch.total, batch.params.get("chunk_size") or chunk_size)
        stamp = mark_published(session, batch_id).timestamp()
    chunks = [job_ids[start : start + size] for start in range(0, len(job_ids), size)]
    return _send_chunks(app, batch_id, recovery_queue_for(queue), chunks, stamp, own_connection=True)


def _send_chunks(
    app: Celery, batch_id: str, queue: str, ids: Iterable[list[int]], stamp: float, own_connection: bool = False
) -> int:
    """Send chunk messages of `batch_id` to `queue`, over one producer (`own_connection`: a new
    connection, not the app's pool; for a worker's parent process, which must not fork pooled sockets)."""
    chunks = 0
    try:
        if own_connection:
            with app.connection_for_write() as connection, connection.Producer() as producer:
                for job_ids in ids:
                    send_chunk(app, batch_id, queue, job_ids, producer, stamp)
                    chunks += 1
        else:
            with app.producer_or_acquire() as producer:
                for job_ids in ids:
                    send_chunk(app, batch_id, queue, job_ids, producer, stamp)
                    chunks += 1
    except KombuOperationalError as error:
        raise BrokerError(
            f"lost the broker after publishing {chunks} chunk(s) of batch {batch_id}: {error}; "
            f"the batch is saved, run `sumfleet requeue {batch_id}` when the broker is back"
        ) from None
    return chunks
