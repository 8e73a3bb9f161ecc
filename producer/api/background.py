"""The API process's background work, in one thread: end batches (files, expiry), deliver webhooks,
delete expired files, and take over the validations of batches whose process died.

Every step is claimed in the database with a conditional UPDATE, so any number of API
processes may run this loop at once; a restarted process picks up where the last one left.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from models.api_store import prune_expired_files
from models.settings import Settings
from models.store import prune_finished, utcnow
from producer.api.lifecycle import advance_all
from producer.api.validation import Validator
from producer.api.webhooks import deliver_due

log = logging.getLogger(__name__)


class Maintainer:
    """Runs `pass_once` every `settings.api_poll_interval` seconds in a daemon thread until stopped."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, validator: Validator | None = None) -> None:
        self.sessions = sessions
        self.settings = settings
        self.validator = validator
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sumfleet-api-maintainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def pass_once(self) -> None:
        """Take over validations nobody holds, end what can end, expire what ran out of time, try every
        due webhook once, delete expired files, and delete one batch past the retention period
        (SUMFLEET_RETENTION_DAYS), if any."""
        if self.validator is not None:
            self.validator.resume_due()
        advance_all(self.sessions)
        deliver_due(self.sessions, self.settings)
        if files := prune_expired_files(self.sessions):
            log.info("expiry: deleted %d expired file(s)", files)
        if self.settings.retention_days is not None:
            before = utcnow() - timedelta(days=self.settings.retention_days)
            pruned, jobs = prune_finished(self.sessions, before, max_batches=1)
            if pruned:
                log.info("retention: deleted a batch that ended before %s (%d jobs)", before.isoformat(), jobs)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pass_once()
            except Exception:  # the database may be away for a while: log, and try again next pass
                log.exception("background pass failed; retrying in %.1fs", self.settings.api_poll_interval)
            self._stop.wait(self.settings.api_poll_interval)
