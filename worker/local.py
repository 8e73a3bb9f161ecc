"""A batch's chunks run in this process, without a broker (`sumfleet run`): the same engine and
chunk code a worker runs, on the same job rows."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from models.adapters import adapter_dir
from models.broker import chunk_size_for
from models.claims import JobOutcome
from models.settings import Settings
from models.states import JobState
from models.store import get_batch, iter_job_id_chunks
from worker.chunk import ChunkProcessor
from worker.identity import worker_id
from worker.loading import load_engine


def run_batch_here(
    settings: Settings,
    sessions: sessionmaker[Session],
    batch_id: str,
    model: str,
    on_batch: Callable[[list[JobOutcome]], None] | None = None,
) -> float:
    """Load `model` and process every queued job of the batch, chunk by chunk (each at least the
    engine's capacity), committing as a worker does; returns the seconds spent after loading."""
    engine = load_engine(model, settings)
    processor = ChunkProcessor(
        sessions,
        engine,
        worker_id(),
        lease_seconds=settings.task_time_limit + settings.lease_grace,
        max_attempts=settings.max_attempts,
        adapters=adapter_dir(settings.adapter_dir),
    )
    started = time.perf_counter()
    with sessions() as session:
        size = chunk_size_for(get_batch(session, batch_id).total, settings.chunk_size)
    size = max(size, int(getattr(engine, "capacity", 0) or 0))  # a chunk always fills a generate call
    for job_ids in iter_job_id_chunks(sessions, batch_id, size, (JobState.QUEUED,)):
        processor.process(batch_id, job_ids, on_batch=on_batch)
    return time.perf_counter() - started
