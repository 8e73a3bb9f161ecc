"""More chunk messages for a task whose own chunk cannot fill its engine.

A worker runs one task (one chunk) at a time. When the chunk holds fewer jobs than the
engine's capacity (a GPU backend takes 128 rows per call, chunks may hold 16), the task takes
further messages of its queue straight from the broker, runs their jobs with its own, and
acknowledges each only after all its results are committed (late, like Celery's own acks).
A process that dies holding them leaves them unacknowledged: the broker restores them after
its visibility timeout, and their jobs' leases let another worker take them over (or its parent
process takes the jobs back at once, `worker.lost`). Queues are tried in the order given: the
recovery queue first, like the worker's own fetches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from models import defaults

log = logging.getLogger(__name__)
MAX_MESSAGES = 64  # chunk messages one task takes on at most


@dataclass
class PulledChunk:
    """A chunk message taken from the broker: its batch and job ids, acknowledged later."""

    batch_id: str
    job_ids: list[int]
    message: Any = field(repr=False)


class ChunkPuller:
    """Takes chunk messages from its queues, in order, without acknowledging them; `ack_all` and `close` end it."""

    def __init__(self, app: Celery, *queues: str) -> None:
        self.app = app
        self.queue_names = list(queues)
        self.connection: Any = None
        self.queues: list[Any] = []
        self.pulled: list[PulledChunk] = []

    @property
    def queue_name(self) -> str:
        return ", ".join(self.queue_names)

    def pull(self, jobs: int, max_messages: int = MAX_MESSAGES) -> list[PulledChunk]:
        """Messages waiting in the queues, until they hold at least `jobs` job ids (none: the queues are empty)."""
        taken: list[PulledChunk] = []
        if jobs <= 0:
            return taken
        try:
            if self.connection is None:
                self.connection = self.app.connection_for_read()
                channel = self.connection.channel()
                # declared as Celery declares a queue it creates: a direct exchange of the same name
                self.queues = [
                    Queue(name, Exchange(name, "direct"), routing_key=name)(channel) for name in self.queue_names
                ]
            fetched = 0
            for queue in self.queues:
                while jobs > 0 and len(taken) < max_messages and fetched < 2 * max_messages:
                    message = queue.get(no_ack=False)
                    fetched += 1
                    if message is None:
                        break
                    chunk = _chunk(message)
                    if chunk is None:  # not a chunk of ours: back to the queue for whoever it is meant for
                        message.requeue()
                        continue
                    taken.append(chunk)
                    jobs -= len(chunk.job_ids)
        except Exception as error:  # the broker is optional here: the task's own chunk still runs
            log.warning("could not take more chunks from %s: %s", self.queue_name, error)
        self.pulled.extend(taken)
        return taken

    def ack_all(self) -> None:
        """Acknowledge every pulled message (their jobs are finished, or released and published again)."""
        for chunk in self.pulled:
            chunk.message.ack()
        self.pulled.clear()

    def close(self) -> None:
        """Close the connection; messages not acknowledged by then go back after the visibility timeout."""
        if self.connection is not None:
            self.connection.release()
            self.connection = None
            self.queues = []


def _chunk(message: Any) -> PulledChunk | None:
    if message.headers.get("task") != defaults.TASK_NAME:
        return None
    body = message.decode()
    args = body[0] if isinstance(body, list | tuple) and body else None
    if not (isinstance(args, list | tuple) and len(args) == 2 and isinstance(args[1], list)):
        return None
    return PulledChunk(str(args[0]), [int(i) for i in args[1]], message)
