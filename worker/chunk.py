"""One chunk of job ids, start to finish. The Celery task and `sumfleet run` both call this."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.adapters import adapter_dir, find_adapter
from models.claims import (
    ClaimedJob,
    JobOutcome,
    add_attempts,
    cancel_held,
    claim_jobs,
    finish_jobs,
    give_up_exhausted,
    release_jobs,
)
from models.prompts import ANY, PromptPlan
from models.quality import warnings_for
from models.states import BatchState
from models.store import batch_state, close_batch_if_done, get_batch, mark_batch_started
from models.tables import Adapter
from worker.backends.base import AdapterSpec
from worker.engine import Engine, GenerationParams
from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """The immutable part of a batch a worker needs: model, prompt, generation parameters."""

    model: str
    queue: str
    prompt: PromptPlan
    params: GenerationParams


@dataclass(slots=True)
class ChunkReport:
    """What happened to one chunk."""

    claimed: int = 0  # jobs this call ran (already finished ones are skipped)
    succeeded: int = 0
    failed: int = 0
    written: int = 0  # outcomes actually stored (less than claimed if another worker took over)
    released: list[int] = field(default_factory=list)  # jobs given back by a graceful stop
    cancelled: int = 0  # claimed jobs given up because their batch was cancelled meanwhile
    prompt_tokens: int = 0  # of the succeeded ones
    output_tokens: int = 0
    # where the chunk's time went: waiting on the engine, and the database work around it (claims,
    # commits of each generation batch's results, the cancel checks between them, closing the batch)
    generate_seconds: float = 0.0
    bookkeeping_seconds: float = 0.0


class ChunkProcessor:
    """Runs chunks of one engine against one database; caches batch specs (they never change)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        engine: Engine,
        worker: str,
        *,
        lease_seconds: float = defaults.TASK_TIME_LIMIT + defaults.LEASE_GRACE,
        max_attempts: int = defaults.MAX_ATTEMPTS,
        should_stop: Callable[[], bool] | None = None,
        requeue: Callable[[str, str, list[int]], None] | None = None,
        adapters: Path | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.should_stop = should_stop  # asked between generation batches (a worker shutting down)
        self.requeue = requeue  # publishes (batch id, queue, job ids) released by a graceful stop
        self.adapters = adapters or adapter_dir(None)  # where adapters' files are (SUMFLEET_ADAPTER_DIR)
        self.heartbeat = heartbeat  # renews the leases of claimed jobs while generation advances (worker.heartbeat)
        self._specs: dict[str, BatchSpec] = {}
        self._started: set[str] = set()  # batches this process has already marked running

    def _spec(self, session: Session, batch_id: str) -> BatchSpec:
        spec = self._specs.get(batch_id)
        if spec is None:
            batch = get_batch(session, batch_id)
            spec = BatchSpec(
                batch.model,
                batch.queue,
                _plan(batch.prompt_template, batch.params),
                GenerationParams.from_batch(batch.params, self._adapter(session, batch.adapter)),
            )
            if len(self._specs) > 1000:
                self._specs.clear()
                self._started.clear()
            self._specs[batch_id] = spec
        return spec

    def _adapter(self, session: Session, ref: str | None) -> AdapterSpec | None:
        """The batch's adapter, as the engine needs it (None: the batch runs without one)."""
        return None if ref is None else _adapter_spec(find_adapter(session, ref), self.adapters)

    def process(
        self, batch_id: str, job_ids: Sequence[int], on_batch: Callable[[list[JobOutcome]], None] | None = None
    ) -> ChunkReport:
        """Claim the chunk's unfinished jobs, generate, and commit each generation batch's results.

        A chunk whose jobs were tried before (their worker died) runs in isolation: one
        document per generation batch, each attempt counted just before it runs, so a
        poison document exhausts only its own attempts. Database errors propagate (the
        caller retries the chunk later); any other error fails the jobs still open with
        that error, so the chunk always ends. A cancelled batch's chunk claims nothing, and
        between generation batches the batch's state is read again: once it is cancelled, the
        jobs not yet generated end `cancelled` and the chunk stops.
        """
        report = ChunkReport()
        started = time.perf_counter()
        with self.sessions.begin() as session:
            spec = self._spec(session, batch_id)
            report.failed += give_up_exhausted(session, job_ids, self.max_attempts)
            cancelled = batch_state(session, batch_id) == BatchState.CANCELLED
            claimed = [] if cancelled else claim_jobs(session, job_ids, self.worker, self.lease_seconds)
            isolate = any(job.attempts > 1 for job in claimed)
            if isolate:  # counted again one by one below
                add_attempts(session, [job.id for job in claimed], -1, self.worker)
            if claimed and batch_id not in self._started:
                mark_batch_started(session, batch_id)
                self._started.add(batch_id)
        report.claimed = len(claimed)
        if claimed:
            open_ids = {job.id for job in claimed}
            if self.heartbeat is not None:
                self.heartbeat.hold(open_ids)
            try:
                if spec.model != self.engine.name:
                    raise RuntimeError(
                        f"batch {batch_id} asks for model {spec.model!r}, but this worker serves {self.engine.name!r}"
                    )
                batches = self._outcomes(claimed, spec, isolate)
                while True:
                    asked = time.perf_counter()
                    outcomes = next(batches, None)
                    report.generate_seconds += time.perf_counter() - asked
                    if outcomes is None:
                        break
                    self._store(outcomes, report, on_batch)
                    open_ids.difference_update(o.job_id for o in outcomes)
                    if self.heartbeat is not None:
                        self.heartbeat.progress([o.job_id for o in outcomes])
                    if open_ids and self._cancelled(batch_id):
                        self._cancel_rest(batch_id, sorted(open_ids), report)
                        open_ids.clear()
                        break
                    if open_ids and self.should_stop is not None and self.should_stop():
                        self._release(batch_id, spec, sorted(open_ids), report)
                        open_ids.clear()
                        break
            except SQLAlchemyError:
                raise
            except Exception as error:  # an engine bug must not leave jobs running forever
                log.exception("chunk of batch %s failed", batch_id)
                reason = f"{type(error).__name__}: {error}"
                self._store([JobOutcome(job_id, error=reason) for job_id in sorted(open_ids)], report, on_batch)
            finally:
                if self.heartbeat is not None:
                    self.heartbeat.release([job.id for job in claimed])
        with self.sessions.begin() as session:
            close_batch_if_done(session, batch_id)
        report.bookkeeping_seconds = time.perf_counter() - started - report.generate_seconds
        return report

    def _cancelled(self, batch_id: str) -> bool:
        """Whether the batch has been cancelled (one primary-key read, between generation batches)."""
        with self.sessions() as session:
            return batch_state(session, batch_id) == BatchState.CANCELLED

    def _cancel_rest(self, batch_id: str, job_ids: list[int], report: ChunkReport) -> None:
        """The batch was cancelled: the claimed jobs not generated yet end cancelled, nothing more runs."""
        with self.sessions.begin() as session:
            report.cancelled = cancel_held(session, job_ids, self.worker)
        log.warning("batch %s was cancelled: gave up %d claimed job(s), now cancelled", batch_id, report.cancelled)

    def _release(self, batch_id: str, spec: BatchSpec, job_ids: list[int], report: ChunkReport) -> None:
        """Graceful stop: give the jobs not started back to the queue (database first, then a message)."""
        with self.sessions.begin() as session:
            report.released = release_jobs(session, job_ids, self.worker)
        if report.released and self.requeue is not None:
            self.requeue(batch_id, spec.queue, report.released)
        log.warning("stopping: returned %d job(s) of batch %s to the queue", len(report.released), batch_id)

    def _outcomes(self, claimed: list[ClaimedJob], spec: BatchSpec, isolate: bool) -> Iterator[list[JobOutcome]]:
        if not isolate:
            yield from self.engine.run(claimed, spec.prompt, spec.params)
            return
        log.warning("retrying %d job(s) one at a time (a worker died on this chunk before)", len(claimed))
        for job in claimed:
            with self.sessions.begin() as session:
                add_attempts(session, [job.id], 1, self.worker)
            yield from self.engine.run([job], spec.prompt, spec.params)

    def _store(
        self,
        outcomes: list[JobOutcome],
        report: ChunkReport,
        on_batch: Callable[[list[JobOutcome]], None] | None,
    ) -> None:
        for outcome in outcomes:  # a plugin engine that does not check its outputs: the text-only checks
            if outcome.warnings is None and outcome.summary is not None:
                outcome.warnings = warnings_for(outcome.summary, finish_reason=outcome.finish_reason)
        with self.sessions.begin() as session:
            report.written += finish_jobs(session, outcomes, self.worker)
        for outcome in outcomes:
            if outcome.error is None:
                report.succeeded += 1
                report.prompt_tokens += outcome.prompt_tokens or 0
                report.output_tokens += outcome.output_tokens or 0
            else:
                report.failed += 1
        if on_batch is not None:
            on_batch(outcomes)


def _adapter_spec(adapter: Adapter, root: Path) -> AdapterSpec:
    virtual = int(adapter.params.get("virtual_tokens") or 0) if adapter.method == "prompt-tuning" else 0
    return AdapterSpec(f"{adapter.name}@{adapter.version}", adapter.method, str(root / adapter.path), virtual)


def _plan(template: str, params: dict[str, object]) -> PromptPlan:
    """The batch's prompt: its language variants (or its one template), language setting and values."""
    variants = cast(dict[str, str], params.get("variants") or {ANY: template})
    values = {"max_words": params["max_words"]} if params.get("max_words") else {}
    return PromptPlan(dict(variants), str(params.get("language") or "auto"), values)
