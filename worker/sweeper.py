"""The sweeper: puts work back on the broker when its messages were lost or its worker died.

Every worker process runs one in a background thread; a Redis lock lets one act per
interval. Each sweep looks at the batches still open:

- running jobs whose lease ran out (their worker was killed or hung) are republished;
- when a batch's queue is empty but it still has queued jobs published longer than
  `republish_after` ago, the messages were lost (Redis restarted empty, flushed): all its
  claimable jobs are republished.

Duplicated messages are harmless: a chunk claims only claimable jobs and writes results
conditionally, so nothing runs twice at once and nothing is written twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from models.broker import publish_batch, send_tuning
from models.settings import Settings
from models.store import as_utc, count_expired, unfinished_batches, utcnow
from models.tuning_runs import requeue_lost

log = logging.getLogger(__name__)
LOCK_KEY = "sumfleet:sweeper"


@dataclass
class SweepReport:
    """What one sweep republished."""

    acted: bool = False  # False when another sweeper held the lock
    batches: int = 0
    chunks: int = 0


class Sweeper:
    """Finds lost work in the database and publishes it again."""

    def __init__(self, sessions: sessionmaker[Session], app: Celery, settings: Settings) -> None:
        self.sessions = sessions
        self.app = app
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=10)

    def sweep(self) -> SweepReport:
        report = SweepReport()
        lock_ms = max(1, int(self.settings.sweep_interval * 900))
        if not self.redis.set(LOCK_KEY, "1", nx=True, px=lock_ms):
            return report
        report.acted = True
        stale_before = utcnow() - timedelta(seconds=self.settings.republish_after)
        lengths: dict[str, int] = {}
        with self.sessions() as session:
            batches = unfinished_batches(session)
        with self.sessions.begin() as session:
            lost = requeue_lost(session)  # tuning runs whose worker died: once each, to resume elsewhere
        for run_id, queue in lost:
            send_tuning(self.app, run_id, queue)
            log.warning("sweeper: tuning run %s lost its worker; published again", run_id)
        for batch_id, queue, published_at in batches:
            if queue not in lengths:
                lengths[queue] = int(self.redis.llen(queue))
            stale = published_at is None or as_utc(published_at) < stale_before
            if lengths[queue] == 0 and stale:
                chunks = publish_batch(self.app, self.sessions, batch_id, self.settings.chunk_size)
            else:
                with self.sessions() as session:
                    expired = count_expired(session, batch_id)
                if not expired:
                    continue
                chunks = publish_batch(self.app, self.sessions, batch_id, self.settings.chunk_size, only_expired=True)
            if chunks:
                log.warning("sweeper: republished %d chunk(s) of batch %s", chunks, batch_id)
                report.batches += 1
                report.chunks += chunks
        return report

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
