"""A worker process's presence in the registry (`models.registry`): recorded when its model is
loaded, a heartbeat every SUMFLEET heartbeat interval from a daemon thread with the documents it
finished and the batch it works on, and `stopped` when it exits cleanly. A process killed
outright simply stops beating and is shown `stale` after `WORKER_STALE_AFTER` seconds."""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.registry import WorkerInfo, heartbeat, register, stopped

log = logging.getLogger(__name__)


def describe(engine: Any) -> tuple[str | None, str | None]:
    """(device, dtype) of a loaded engine, where its backend says (a transformers model); else (cpu, None)."""
    backend = getattr(engine, "backend", engine)
    device = getattr(backend, "device", None)
    model = getattr(backend, "model", None)
    dtype = getattr(model, "dtype", None)
    return (str(device) if device is not None else "cpu"), (str(dtype).removeprefix("torch.") if dtype else None)


class Presence:
    """Records this process and keeps its heartbeat; `working`/`done` tell it what the process does."""

    def __init__(
        self, sessions: sessionmaker[Session], info: WorkerInfo, interval: float = defaults.HEARTBEAT_INTERVAL
    ) -> None:
        self.sessions = sessions
        self.info = info
        self.interval = interval
        self.documents = 0
        self.batch: str | None = None
        self._stop = threading.Event()

    def start(self) -> Presence:
        try:
            with self.sessions.begin() as session:
                register(session, self.info)
        except Exception as error:  # the registry is for operators: never a reason not to work
            log.warning("worker registry: cannot record %s: %s", self.info.id, type(error).__name__)
        threading.Thread(target=self._beat, name="sumfleet-heartbeat", daemon=True).start()
        atexit.register(self.stop)
        return self

    def working(self, batch_id: str | None) -> None:
        self.batch = batch_id

    def done(self, documents: int) -> None:
        self.documents += documents

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.sessions.begin() as session:
                    heartbeat(session, self.info.id, self.documents, self.batch)
            except Exception as error:  # the database may be away for a while: beat again later
                log.debug("worker registry: heartbeat failed: %s", type(error).__name__)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            with self.sessions.begin() as session:
                stopped(session, self.info.id)
        except Exception:  # exiting anyway
            pass
