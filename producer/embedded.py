"""`sumfleet run`: the whole pipeline in one process, on the same job rows and chunk code as the fleet."""

from __future__ import annotations

import sys
import time
from typing import Any

from models.settings import Settings
from models.states import JobState
from models.store import iter_job_id_chunks
from producer.client import Client
from producer.export import write_results
from worker.chunk import ChunkProcessor
from worker.identity import worker_id


def run_embedded(settings: Settings, source: str, output: str, *, progress: bool = True, **options: Any) -> int:
    """Submit `source` without publishing, process every chunk here, export to `output`."""
    from worker.engines.loading import load_engine

    client = Client(settings)
    submission = client.submit_file(source, publish=False, model=settings.model, **options)
    for problem in submission.problems:
        print(f"skipped {problem}", file=sys.stderr)
    batch = client.status(submission.batch_id)
    print(f"batch {batch.id}: {batch.total} documents, model {batch.model}; loading the model", file=sys.stderr)
    engine = load_engine(batch.model, settings)
    processor = ChunkProcessor(
        client.sessions,
        engine,
        worker_id(),
        lease_seconds=settings.task_time_limit + settings.lease_grace,
        max_attempts=settings.max_attempts,
    )
    started = time.perf_counter()
    bar = _bar(batch.total, progress)
    try:
        for job_ids in iter_job_id_chunks(client.sessions, batch.id, settings.chunk_size, (JobState.QUEUED,)):
            processor.process(batch.id, job_ids, on_batch=lambda outcomes: bar.update(len(outcomes)))
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    written = write_results(client.results(batch.id), output)
    final = client.status(batch.id)
    succeeded, failed = final.counts.get("succeeded", 0), final.counts.get("failed", 0)
    print(
        f"batch {batch.id}: succeeded {succeeded}, failed {failed}, elapsed {elapsed:.1f}s, "
        f"{(succeeded + failed) / elapsed if elapsed else 0:.2f} docs/s; {written} results -> {output}",
        file=sys.stderr,
    )
    client.close()
    return 0 if failed == 0 else 3


def _bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
