"""`sumfleet run`: submit without publishing, have the chunks run in this process, export.

The producer does not import the worker: the command line hands in `run_batch`, the worker's
in-process runner (`worker.local.run_batch_here`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models.claims import JobOutcome
from models.settings import Settings
from producer.client import Client
from producer.export import check_output, write_results

# (settings, sessions, batch id, model, on_batch) -> seconds spent after loading the model
RunBatch = Callable[[Settings, sessionmaker[Session], str, str, Callable[[list[JobOutcome]], None] | None], float]


def run_embedded(
    settings: Settings, source: str, output: str, run_batch: RunBatch, *, progress: bool = True, **options: Any
) -> int:
    """Submit `source` without publishing, run every chunk with `run_batch`, export to `output`."""
    check_output(output)  # an unwritable output fails now, not after the whole corpus is summarized
    client = Client(settings)
    submission = client.submit_file(source, publish=False, model=settings.model, **options)
    for problem in submission.problems:
        print(f"skipped {problem}", file=sys.stderr)
    batch = client.status(submission.batch_id)
    print(f"batch {batch.id}: {batch.total} documents, model {batch.model}; loading the model", file=sys.stderr)
    bar = _bar(batch.total, progress)
    try:
        elapsed = run_batch(settings, client.sessions, batch.id, batch.model, lambda done: bar.update(len(done)))
    finally:
        bar.close()
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


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
