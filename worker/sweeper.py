"""The sweeper: puts work back on the broker when its messages were lost or its worker died.

Every worker process runs one in a background thread; a Redis lock lets one act per
interval. Each sweep looks at the batches still open:

- running jobs whose lease ran out (their worker was killed or hung) are taken back: queued
  again (failed when that was their last attempt) and published once to the batch's recovery
  queue, which workers consume before new work. Queued, they are no longer expired, so the next
  sweep does not publish them again; only a new expiry would. (A pool process that dies under a
  live parent gives its jobs back at once instead, `worker.lost`.)
- a batch with queued jobs whose messages were lost (Redis restarted empty, flushed, a message
  dropped) is published again, to its recovery queue, when its last publish is older than
  `republish_after` and either its queue is empty, or the queue has moved past its messages and
  it has made no progress (no job finished) for `republish_after` seconds, however busy the queue
  is with other batches. "Moved past": the message next in line was published after this batch's
  last publish (every chunk message carries its publish's time), so none of the batch's can still
  be waiting; a batch that merely waits its turn behind others is left alone. Its publish time is
  then now, so that happens at most once per `republish_after`.
- a cancelled batch's jobs that nobody runs (queued ones, and those of a dead worker) end
  cancelled, so a cancelled batch never keeps jobs running or queued forever.

Duplicated messages are harmless: a chunk claims only claimable jobs and writes results
conditionally, so nothing runs twice at once and nothing is written twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from models.broker import publish_batch, published_stamp, recovery_queue_for, republish_jobs, send_tuning
from models.claims import reclaim_jobs
from models.errors import InvalidTransition
from models.metrics import ATTEMPTS_EXHAUSTED, LEASES_TAKEN_OVER, REPUBLISHED
from models.settings import Settings
from models.states import BatchState
from models.store import OpenBatch, as_utc, cancel_unfinished, count_expired, open_batches, utcnow
from models.tuning_runs import requeue_lost

log = logging.getLogger(__name__)
LOCK_KEY = "sumfleet:sweeper"
PROGRESS_KEY = "sumfleet:sweeper:progress"  # batch id -> "<jobs finished>:<unix time first seen at that count>"


@dataclass
class SweepReport:
    """What one sweep republished."""

    acted: bool = False  # False when another sweeper held the lock
    batches: int = 0
    chunks: int = 0


def broker_client(app: Celery, socket_timeout: float = 10.0) -> Any:
    """A Redis client for the broker's own database, built the way kombu reads the broker URL, so every
    URL form the workers accept works here too (`redis://`, `rediss://`, `redis+socket:///path.sock`,
    `socket://`, a global key prefix); redis-py's `from_url` knows only some of them."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        pool = channel.pool
        own = redis.ConnectionPool(
            connection_class=pool.connection_class, **{**pool.connection_kwargs, "socket_timeout": socket_timeout}
        )
        return channel.Client(connection_pool=own)


class Sweeper:
    """Finds lost work in the database and publishes it again."""

    def __init__(self, sessions: sessionmaker[Session], app: Celery, settings: Settings) -> None:
        self.sessions = sessions
        self.app = app
        self.settings = settings
        self._redis: Any = None  # connected on the first sweep, in the sweeper's thread

    @property
    def redis(self) -> Any:
        if self._redis is None:
            self._redis = broker_client(self.app)
        return self._redis

    def sweep(self) -> SweepReport:
        report = SweepReport()
        lock_ms = max(1, int(self.settings.sweep_interval * 900))
        if not self.redis.set(LOCK_KEY, "1", nx=True, px=lock_ms):
            return report
        report.acted = True
        with self.sessions() as session:
            batches = open_batches(session)
        with self.sessions.begin() as session:
            lost = requeue_lost(session)  # tuning runs whose worker died: once each, to resume elsewhere
        for run_id, queue in lost:
            send_tuning(self.app, run_id, queue)
            log.warning("sweeper: tuning run %s lost its worker; published again", run_id)
        self._forget_progress({batch.id for batch in batches})
        next_in_line: dict[str, float | None] = {}
        for batch in batches:
            try:
                if batch.state == BatchState.CANCELLED.value:
                    self._wind_down(batch)
                    continue
                self._sweep_batch(batch, next_in_line, report)
            except InvalidTransition:  # it ended (cancelled, say) since it was listed: nothing to publish
                continue
        return report

    def _wind_down(self, batch: OpenBatch) -> None:
        """A cancelled batch: its queued jobs and a dead worker's running ones end cancelled."""
        with self.sessions.begin() as session:
            cancelled = cancel_unfinished(session, batch.id)
        if cancelled:
            log.warning("sweeper: batch %s is cancelled: %d job(s) nobody runs now cancelled", batch.id, cancelled)

    def _sweep_batch(self, batch: OpenBatch, next_in_line: dict[str, float | None], report: SweepReport) -> None:
        now = utcnow()
        published_at = batch.published_at
        queued = batch.queued
        if batch.running:
            with self.sessions() as session:
                expired = count_expired(session, batch.id)
            if expired:
                with self.sessions.begin() as session:
                    reclaimed = reclaim_jobs(session, [batch.id], self.settings.max_attempts)
                if reclaimed.failed:
                    ATTEMPTS_EXHAUSTED.labels(batch.queue).inc(reclaimed.failed)
                    log.warning(
                        "sweeper: batch %s: %d job(s) lost their worker %d times and failed",
                        batch.id,
                        reclaimed.failed,
                        self.settings.max_attempts,
                    )
                ids = reclaimed.queued.get(batch.id, [])
                if ids:  # once per expiry: queued now, they are not expired at the next sweep
                    chunks = republish_jobs(self.app, self.sessions, batch.id, ids, self.settings.chunk_size)
                    log.warning(
                        "sweeper: republished %d chunk(s) of batch %s: %d job(s) whose lease ran out, first in line",
                        chunks,
                        batch.id,
                        len(ids),
                    )
                    report.batches += 1
                    report.chunks += chunks
                    REPUBLISHED.labels(batch.queue).inc(chunks)
                    LEASES_TAKEN_OVER.labels(batch.queue).inc(len(ids))
                    published_at, queued = now, queued + len(ids)
                    next_in_line.pop(batch.queue, None)  # its queue is no longer what this sweep saw
        if not queued:
            return
        recent = now - timedelta(seconds=self.settings.republish_after)
        if published_at is not None and as_utc(published_at) >= recent:
            return
        if published_at is None and as_utc(batch.created_at) >= recent:
            return  # just submitted: its publish may still be under way (a sweep between the two republished it)
        if batch.queue not in next_in_line:
            next_in_line[batch.queue] = self._next_in_line(batch.queue)
        waiting = next_in_line[batch.queue]
        if published_at is None:
            why = "it was never published"  # committed, then its publish failed (submit said so)
        elif waiting is None:
            why = "its queue is empty: its messages were lost"
        elif waiting > as_utc(published_at).timestamp() + 0.001 and self._stalled(batch):
            why = (
                f"the queue moved past its messages and no job of it finished for {self.settings.republish_after:g}s: "
                "they were lost"
            )
        else:
            return
        chunks = publish_batch(self.app, self.sessions, batch.id, self.settings.chunk_size, recovery=True)
        self._progress(batch.id, batch.finished)  # the next republish needs another window without progress
        if chunks:
            if waiting is None:
                next_in_line[batch.queue] = time.time()
            log.warning(
                "sweeper: republished %d chunk(s) of batch %s, first in line: %s",
                chunks,
                batch.id,
                why,
            )
            report.batches += 1
            report.chunks += chunks
            REPUBLISHED.labels(batch.queue).inc(chunks)

    def _next_in_line(self, queue: str) -> float | None:
        """When the message next in line on `queue` was published (the older of the heads of its
        recovery queue and of the queue, where workers take from); None when both are empty, 0 when
        a message there carries no time (of unknown age: taken as older than any batch)."""
        stamps: list[float] = []
        for name in (recovery_queue_for(queue), queue):
            head = self.redis.lindex(name, -1)  # producers push on the left, workers pop on the right
            if head is not None:
                stamp = published_stamp(head)
                stamps.append(0.0 if stamp is None else stamp)
        return min(stamps) if stamps else None

    def _stalled(self, batch: OpenBatch) -> bool:
        """No job of the batch finished for `republish_after` seconds (as the sweeps of every worker
        process saw it: the count is kept in Redis next to the lock)."""
        seen = self.redis.hget(PROGRESS_KEY, batch.id)
        if seen is not None:
            count, _, since = seen.decode().partition(":")
            if int(count) == batch.finished:
                return time.time() - float(since) >= self.settings.republish_after
        self._progress(batch.id, batch.finished)
        return False

    def _progress(self, batch_id: str, finished: int) -> None:
        self.redis.hset(PROGRESS_KEY, batch_id, f"{finished}:{time.time()}")

    def _forget_progress(self, open_ids: set[str]) -> None:
        ended = [key for key in self.redis.hkeys(PROGRESS_KEY) if key.decode() not in open_ids]
        if ended:
            self.redis.hdel(PROGRESS_KEY, *ended)

    def run(self, stop: threading.Event) -> None:
        """Sweep every `sweep_interval` seconds until `stop` is set; errors are logged, never fatal."""
        while not stop.wait(self.settings.sweep_interval):
            try:
                self.sweep()
            except Exception as error:  # the database or broker may be briefly away: try again next time
                first = str(error).strip().splitlines()[:1]
                log.warning(
                    "sweeper: sweep failed (%s: %s); next try in %.0fs",
                    type(error).__name__,
                    first,
                    self.settings.sweep_interval,
                )

    def start(self) -> threading.Event:
        stop = threading.Event()
        threading.Thread(target=self.run, args=(stop,), name="sumfleet-sweeper", daemon=True).start()
        return stop
