"""Leases and the time limit follow progress, not the size of a chunk.

A worker process holds its claimed jobs under a lease (`SUMFLEET_TASK_TIME_LIMIT` +
`SUMFLEET_LEASE_GRACE` from the last renewal). While generation advances, a thread of the
process renews the lease of the jobs it still holds, a few times per lease; so a chunk may run
as long as it needs on a slow or busy machine, as long as its generate calls keep finishing.

Progress is a backend `generate()` call that returned, or a generation batch whose results
were committed. When none came for `SUMFLEET_TASK_TIME_LIMIT` seconds, the process is stuck
(an engine that hangs, a generate call far beyond what the hardware can do): the thread stops
renewing and kills its own process. Its parent sees the pool process die and takes its jobs
back at once (`worker.lost`): they are queued again, first in line, with the death counted
against their attempts, so a document that hangs every worker ends failed after its attempts.

A process that is frozen (SIGSTOP, a host that hangs) renews nothing: its leases run out and
the sweeper of any live worker takes the jobs over. Renewal is by primary key and only of rows
still running under this worker's name, so a lease that another worker took over after an
outage is never taken back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models.claims import renew_leases

log = logging.getLogger(__name__)
MAX_INTERVAL = 30.0  # seconds between two checks at most, whatever the lease
RENEW_PAGE = 1000  # ids per renewal statement


def kill_this_process() -> None:
    """What a stuck worker process does: die at once, so that its parent takes its jobs back."""
    os.kill(os.getpid(), signal.SIGKILL)


class Heartbeat:
    """Renews the leases of the jobs this process holds while generation advances; ends the
    process when no progress came for `limit` seconds."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        worker: str,
        *,
        lease_seconds: float,
        limit: float,
        on_stall: Callable[[], None] = kill_this_process,
        interval: float | None = None,
    ) -> None:
        self.sessions = sessions
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.limit = limit
        self.on_stall = on_stall
        self.interval = interval or max(0.2, min(MAX_INTERVAL, lease_seconds / 3, limit / 3))
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0  # statements that renewed leases (for tests and logs)

    def start(self) -> Heartbeat:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sumfleet-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def hold(self, job_ids: Collection[int]) -> None:
        """Jobs were claimed: their leases are renewed from now on (the claim counts as progress)."""
        with self._lock:
            self._held.update(job_ids)
            self._last_progress = time.monotonic()

    def progress(self, finished: Collection[int] = ()) -> None:
        """Generation advanced; `finished` jobs are no longer held (their results are committed)."""
        with self._lock:
            self._held.difference_update(finished)
            self._last_progress = time.monotonic()

    def release(self, job_ids: Collection[int] | None = None) -> None:
        """Stop renewing `job_ids` (all held jobs when None): the chunk ended."""
        with self._lock:
            if job_ids is None:
                self._held.clear()
            else:
                self._held.difference_update(job_ids)

    def stalled_for(self) -> float:
        """Seconds since the last progress while jobs are held (0 when none are)."""
        with self._lock:
            return time.monotonic() - self._last_progress if self._held else 0.0

    def check(self) -> None:
        """One beat: renew the held leases while progress is recent; give up the process when it is not."""
        with self._lock:
            held = sorted(self._held)
            idle = time.monotonic() - self._last_progress
        if not held:
            return
        if idle > self.limit:
            log.error(
                "no generation progress for %.0fs (limit %ss) with %d job(s) held: ending this process so that "
                "its jobs are taken back at once",
                idle,
                self.limit,
                len(held),
            )
            self.on_stall()
            return
        try:
            self.renew(held)
        except Exception as error:  # the database is down: the leases may run out; takeover handles that
            log.warning("could not renew the leases of %d job(s): %s", len(held), str(error).splitlines()[0])

    def renew(self, job_ids: list[int]) -> int:
        """Push the leases of `job_ids` (still running under this worker's name) to now + lease."""
        renewed = 0
        with self.sessions.begin() as session:
            for start in range(0, len(job_ids), RENEW_PAGE):
                renewed += renew_leases(session, job_ids[start : start + RENEW_PAGE], self.worker, self.lease_seconds)
        self.renewals += 1
        return renewed

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()


def beat_on_generate(engine: Any, heartbeat: Heartbeat) -> None:
    """Count every `generate()` call of `engine`'s backend that returns, and every step of its
    `generate_stream` that finishes rows, as progress (map-reduce runs many calls before a document's
    result exists). Engines without a backend beat per result batch."""
    backend = getattr(engine, "backend", None)
    generate = getattr(backend, "generate", None)
    if backend is None or generate is None:
        return

    def beating(rows: Any) -> Any:
        try:
            return generate(rows)
        finally:
            heartbeat.progress()

    backend.generate = beating
    stream = getattr(backend, "generate_stream", None)
    if stream is None:
        return

    def streaming(rows: Any) -> Any:  # continuous batching: every step that finished rows
        for finished in stream(rows):
            heartbeat.progress()
            yield finished

    backend.generate_stream = streaming
