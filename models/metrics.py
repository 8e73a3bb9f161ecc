"""Prometheus metrics: what workers count as they go, and what the database and broker say at scrape.

Documents, not chunks, are the unit. Workers count in their own processes (prefork children
included): `sumfleet worker --metrics-port` sets `PROMETHEUS_MULTIPROC_DIR` before any child
starts, so every process writes its samples to that folder and the port serves their sum.
The fleet's state (backlog, batches, jobs by state, webhook deliveries) is read from the
batches' counters and the broker when `/metrics` is scraped (`FleetCollector`), by the API and
by workers alike, so it is exact and costs a few indexed queries per scrape, never a scan of
jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.states import BatchState
from models.store import utcnow
from models.tables import Batch, WebhookDelivery, WorkerRecord

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNFINISHED = (BatchState.QUEUED.value, BatchState.RUNNING.value)
JOB_COUNTERS = {
    "queued": Batch.jobs_queued,
    "running": Batch.jobs_running,
    "succeeded": Batch.jobs_succeeded,
    "failed": Batch.jobs_failed,
    "cancelled": Batch.jobs_cancelled,
}
GENERATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

DOCUMENTS = Counter("sumfleet_documents", "Documents finished by the workers, by status", ["model", "status"])
PROMPT_TOKENS = Counter("sumfleet_prompt_tokens", "Prompt tokens of succeeded documents", ["model"])
OUTPUT_TOKENS = Counter("sumfleet_output_tokens", "Generated tokens of succeeded documents", ["model"])
GENERATE_SECONDS = Histogram(
    "sumfleet_generate_seconds",
    "Wall seconds of one generate() call (or continuous batch)",
    ["model"],
    buckets=GENERATE_BUCKETS,
)
GENERATE_BATCH = Histogram(
    "sumfleet_generate_batch_size",
    "Rows in one generate() call (or continuous batch)",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
)
IN_FLIGHT = Gauge(
    "sumfleet_documents_in_flight", "Documents claimed and not yet written", ["model"], multiprocess_mode="livesum"
)
MODEL_LOAD_SECONDS = Gauge(
    "sumfleet_model_load_seconds", "Seconds the last model load took", ["model"], multiprocess_mode="max"
)
OOM_SPLITS = Counter("sumfleet_oom_splits", "Generation batches split in half after running out of memory", ["model"])
LEASES_TAKEN_OVER = Counter(
    "sumfleet_leases_taken_over", "Documents taken back from a dead worker (lease ran out, or death seen)", ["queue"]
)
ATTEMPTS_EXHAUSTED = Counter(
    "sumfleet_attempts_exhausted", "Documents failed for good: their worker died SUMFLEET_MAX_ATTEMPTS times", ["queue"]
)
REPUBLISHED = Counter("sumfleet_sweeper_republished_chunks", "Chunk messages the sweeper published again", ["queue"])


def worker_registry() -> CollectorRegistry:
    """The samples of every process sharing `PROMETHEUS_MULTIPROC_DIR`, summed."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def process_exited(pid: int) -> None:
    """Forget a dead process's live gauges (documents in flight) in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class FleetCollector(Collector):
    """The fleet's state when scraped: backlog and jobs by state from the unfinished batches'
    counters, batches unfinished, messages waiting per queue, webhook deliveries by state."""

    def __init__(self, sessions: sessionmaker[Session], queue_length: QueueLength | None = None) -> None:
        self.sessions = sessions
        self.queue_length = queue_length

    def collect(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "sumfleet_queue_documents", "Documents queued (not yet claimed) in unfinished batches", labels=["model"]
        )
        jobs = GaugeMetricFamily("sumfleet_jobs", "Jobs of unfinished batches, by state", labels=["model", "state"])
        batches = GaugeMetricFamily("sumfleet_unfinished_batches", "Batches queued or running", labels=["model"])
        messages = GaugeMetricFamily("sumfleet_queue_messages", "Chunk messages in the broker", labels=["queue"])
        webhooks = GaugeMetricFamily("sumfleet_webhook_deliveries", "Webhook deliveries by state", labels=["state"])
        live = GaugeMetricFamily("sumfleet_live_workers", "Worker processes with a recent heartbeat", labels=["model"])
        columns = [func.coalesce(func.sum(column), 0) for column in JOB_COUNTERS.values()]
        queues: set[str] = set()
        try:
            with self.sessions() as session:
                rows = session.execute(
                    select(Batch.model, Batch.queue, func.count(), *columns)
                    .where(Batch.state.in_(UNFINISHED))
                    .group_by(Batch.model, Batch.queue)
                ).all()
                deliveries = session.execute(
                    select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state)
                ).all()
                since = utcnow() - timedelta(seconds=defaults.WORKER_STALE_AFTER)
                workers = session.execute(
                    select(WorkerRecord.model, func.count())
                    .where(WorkerRecord.heartbeat_at >= since, WorkerRecord.stopped_at.is_(None))
                    .group_by(WorkerRecord.model)
                ).all()
        except Exception as error:  # a scrape must answer: the database's part is left out this time
            log.warning("metrics: cannot read the database: %s", type(error).__name__)
            return
        per_model: dict[str, list[int]] = {}
        for model, queue, count, *counts in rows:
            queues.add(queue)
            totals = per_model.setdefault(model, [0] * (1 + len(JOB_COUNTERS)))
            for i, value in enumerate([count, *counts]):
                totals[i] += int(value)
        for model, (count, *counts) in sorted(per_model.items()):
            batches.add_metric([model], count)
            backlog.add_metric([model], counts[0])
            for state, value in zip(JOB_COUNTERS, counts, strict=True):
                jobs.add_metric([model, state], value)
        shown = {"pending": 0, "delivered": 0, "failed": 0}
        shown.update({state: int(count) for state, count in deliveries})
        for state, count in sorted(shown.items()):
            webhooks.add_metric([state], count)
        for model, count in sorted(workers):
            live.add_metric([model], int(count))
        yield from (backlog, jobs, batches, webhooks, live)
        if self.queue_length is not None:
            for queue in sorted(queues):
                try:
                    messages.add_metric([queue], self.queue_length(queue))
                except Exception as error:  # the broker away: its part is left out this time
                    log.warning("metrics: cannot read queue %s: %s", queue, type(error).__name__)
                    return
            yield messages


class QueueLength:
    """LLEN of a queue on the broker (Redis), with a short timeout."""

    def __init__(self, broker_url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)

    def __call__(self, queue: str) -> int:
        """Messages waiting for `queue`'s workers: its own list and its recovery list (work taken
        back from dead workers, consumed first)."""
        from models.broker import recovery_queue_for

        return int(self.redis.llen(queue)) + int(self.redis.llen(recovery_queue_for(queue)))


def meter_generation(engine: Any, model: str) -> None:
    """Time every `generate()` call of `engine`'s backend, and every continuous batch of its
    `generate_stream` (seconds and rows, histograms), and count
    the calls that ran out of memory (the pipeline splits those in half). The backend keeps its
    type; only this instance's `generate` is wrapped. Engines without a backend (lead, plugins
    that generate themselves) are left as they are."""
    backend = getattr(engine, "backend", None)
    generate = getattr(backend, "generate", None)
    if backend is None or generate is None:
        return
    seconds, rows_per_call, oom = GENERATE_SECONDS.labels(model), GENERATE_BATCH.labels(model), OOM_SPLITS.labels(model)

    @contextlib.contextmanager
    def call(rows: Any) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as error:
            if backend.is_out_of_memory(error):
                oom.inc()
            raise
        finally:
            seconds.observe(time.perf_counter() - started)
            rows_per_call.observe(len(rows))

    def metered(rows: Any) -> Any:
        with call(rows):
            return generate(rows)

    backend.generate = metered
    stream = getattr(backend, "generate_stream", None)
    if stream is None:
        return

    def metered_stream(rows: Any) -> Any:  # continuous batching: the whole batch counts as one call
        with call(rows):
            yield from stream(rows)

    backend.generate_stream = metered_stream
