"""The Python API: submit documents, follow batches, read results.

from producer import Client
client = Client()                       # settings from SUMFLEET_* env
sub = client.submit_file("corpus.jsonl", prompt="headline")
client.wait(sub.batch_id)
for row in client.results(sub.batch_id): ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.adapters import check_name, find_adapter, usable_for
from models.broker import check_broker, create_app, publish_batch, queue_for, send_tuning, tune_queue_for
from models.counters import counts_of, differences, recount
from models.counters import repair as repair_counters
from models.db import ensure_schema, hide_password, open_database, session_factory
from models.errors import DatabaseError, InputError, NotPublished, RowProblem, SumfleetError
from models.job_writer import JobWriter
from models.model_names import canonical_model, resolve_model
from models.prompts import check_language, resolve_prompt
from models.registry import is_live, live_on, nobody_serves
from models.registry import workers as registered_workers
from models.settings import Settings, load_settings
from models.states import BatchState
from models.store import (
    as_utc,
    cancel_batch,
    create_batch,
    get_batch,
    iter_results,
    list_batches,
    prune_finished,
)
from models.tables import Batch, Job
from models.tuning_runs import create_run, get_run
from producer.inputs import Document, duplicate_reason, python_documents, read_documents, unstorable


@dataclass(frozen=True)
class Submission:
    """What `submit` accepted: the batch id, the documents taken, and the bad rows skipped."""

    batch_id: str
    accepted: int
    chunks: int
    problems: list[RowProblem] = field(default_factory=list)
    reused: bool = False  # an earlier submission with the same idempotency key: this is its batch


@dataclass(frozen=True)
class BatchStatus:
    """A batch and its job counts at one moment."""

    id: str
    state: str
    model: str
    prompt: str
    source: str | None
    total: int
    counts: dict[str, int]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    adapter: str | None = None  # name@version of the tuned adapter it runs with
    warning: str | None = None  # e.g. no live worker serves its model (from the worker registry)

    @classmethod
    def of(cls, batch: Batch, counts: dict[str, int], warning: str | None = None) -> BatchStatus:
        """The status of `batch` with its job counts per state."""
        return cls(
            id=batch.id,
            state=batch.state,
            model=batch.model,
            prompt=batch.prompt_name,
            source=batch.source,
            total=batch.total,
            counts=counts,
            created_at=batch.created_at,
            started_at=batch.started_at,
            finished_at=batch.finished_at,
            adapter=batch.adapter,
            warning=warning,
        )

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))

    @property
    def done(self) -> bool:
        return BatchState(self.state).finished

    @property
    def elapsed(self) -> float | None:
        """Seconds from the first job starting to the end (or to now)."""
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(UTC)
        return max((as_utc(end) - as_utc(self.started_at)).total_seconds(), 1e-9)

    @property
    def docs_per_second(self) -> float | None:
        elapsed = self.elapsed
        return self.finished / elapsed if elapsed and self.finished else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.docs_per_second
        return (self.total - self.finished) / rate if rate and not self.done else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "model": self.model,
            "prompt": self.prompt,
            "adapter": self.adapter,
            "source": self.source,
            "total": self.total,
            "counts": self.counts,
            "docs_per_second": self.docs_per_second,
            "eta_seconds": self.eta_seconds,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "warning": self.warning,
        }


def result_row(job: Job, adapter: str | None = None) -> dict[str, Any]:
    """One exported result: the same shape from `results`, `run -o` and the API (`adapter`: the batch's)."""
    return {
        "id": job.doc_id,
        "summary": job.summary,
        "status": job.state,
        "error": job.error,
        "prompt_variant": job.prompt_variant,
        "adapter": adapter,
        "prompt_tokens": job.prompt_tokens,
        "output_tokens": job.output_tokens,
        "generation_seconds": job.generation_seconds,
        "pieces": job.pieces,
        "levels": job.levels,
        "finish_reason": job.finish_reason,
        "warnings": job.warnings,
        "attempts": job.attempts,
        "worker": job.worker,
        "queued_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


RESULT_FIELDS = (  # the columns of result_row, in order (CSV header)
    "id",
    "summary",
    "status",
    "error",
    "prompt_variant",
    "adapter",
    "prompt_tokens",
    "output_tokens",
    "generation_seconds",
    "pieces",
    "levels",
    "finish_reason",
    "warnings",
    "attempts",
    "worker",
    "queued_at",
    "started_at",
    "finished_at",
)


class Client:
    """Producer-side access to one database (and, for publishing, one broker)."""

    def __init__(self, settings: Settings | None = None, *, migrate: bool = True) -> None:
        self.settings = settings or load_settings()
        self.database = open_database(self.settings.database_url)
        self._migrate = migrate
        self._schema_checked = False
        self.sessions: sessionmaker[Session] = session_factory(self.database)
        self._app: Celery | None = None

    # -- setup -----------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        if not self._schema_checked:
            ensure_schema(self.database, migrate=self._migrate)
            self._schema_checked = True

    @property
    def app(self) -> Celery:
        """The Celery app this client publishes with (made on first use)."""
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    # -- submitting ------------------------------------------------------------------------

    def submit_file(
        self,
        path: str,
        *,
        skip_bad_rows: bool = False,
        fmt: str | None = None,
        text_field: str | None = None,
        id_field: str | None = None,
        publish: bool = True,
        **options: Any,
    ) -> Submission:
        """Submit every document of a JSONL/CSV/TSV/Parquet file, a directory of .txt/.md, a saved Hugging Face
        dataset's folder, or `-` (stdin): `producer.inputs.read_documents`, whose `fmt` names are `FORMATS`."""
        problems: list[RowProblem] = []
        documents = read_documents(
            path,
            problems,
            fmt=fmt,
            text_field=text_field,
            id_field=id_field,
            max_chars=self.settings.max_document_chars,
            check_duplicates=False,  # the job writer finds them, in flat memory
        )
        return self.submit_documents(
            documents, problems, source=path, skip_bad_rows=skip_bad_rows, publish=publish, **options
        )

    def submit(
        self,
        documents: Iterable[str | Mapping[str, Any]],
        *,
        skip_bad_rows: bool = False,
        publish: bool = True,
        **options: Any,
    ) -> Submission:
        """Submit documents given as strings or mappings with `text` (or `document`) and optional `id`."""
        problems: list[RowProblem] = []
        return self.submit_documents(
            python_documents(documents, problems, self.settings.max_document_chars, check_duplicates=False),
            problems,
            source="<python>",
            skip_bad_rows=skip_bad_rows,
            publish=publish,
            **options,
        )

    def submit_documents(
        self,
        documents: Iterable[Document],
        problems: list[RowProblem],
        *,
        source: str,
        skip_bad_rows: bool,
        publish: bool,
        model: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        queue: str | None = None,
        language: str | None = None,
        max_words: int | None = None,
        long_documents: str | None = None,
        trim: str | None = None,
        adapter: str | None = None,
        idempotency_key: str | None = None,
        before_commit: Callable[[Session, Batch], None] | None = None,
    ) -> Submission:
        """Submit already-read documents as one batch; the other submit methods end here.

        `problems` holds the bad rows found while reading (the reader appends as it goes):
        they refuse the whole submission unless `skip_bad_rows`. Everything is one
        transaction; `before_commit(session, batch)` may add rows of its own to it (the HTTP
        API records the batch's owner). Messages are published only after the commit.

        `trim`: `sentence` (the default, `SUMFLEET_TRIM`) cuts a summary that stopped at
        `max_new_tokens` back to its last complete sentence, if it has one; `none` keeps it as generated.

        `idempotency_key`: a submission with a key already used returns that first batch
        (`reused` True) and reads nothing, so a caller may retry after any error. Once the batch
        is committed, a failure to publish raises `NotPublished` carrying the batch id: the batch
        is saved and runs (a worker's sweeper publishes it); do not submit it again.
        """
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255 or unstorable(idempotency_key):
                raise InputError("idempotency key must be 1-255 characters with no NUL or lone surrogate")
            if (earlier := self._idempotent(idempotency_key)) is not None:
                return earlier
        model = canonical_model(model or self.settings.model)
        resolve_model(model, self.settings, need_files=False)
        if adapter is not None:  # the exact version it runs with, tuned on this very model; its template by default
            self.ensure_schema()
            with self.sessions() as session:
                found = find_adapter(session, adapter)
                usable_for(found, model)
            adapter = f"{found.name}@{found.version}"
            prompt = found.params.get("prompt") if prompt is None else prompt
        for option, value in (("max_new_tokens", max_new_tokens), ("max_words", max_words)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InputError(f"{option} must be a whole number, got {value!r} ({type(value).__name__})")
        resolved = resolve_prompt(self.settings.prompt if prompt is None else prompt)
        language = check_language(language or "auto")
        if max_words is not None and not 1 <= max_words <= 10_000:
            raise InputError(f"--max-words must be between 1 and 10000, got {max_words}")
        long_documents = long_documents or self.settings.long_documents
        if long_documents not in defaults.LONG_DOCUMENT_STRATEGIES:
            raise InputError(
                f"--long-documents must be one of {', '.join(defaults.LONG_DOCUMENT_STRATEGIES)}, "
                f"got {long_documents!r}"
            )
        trim = trim or self.settings.trim
        if trim not in defaults.TRIM_MODES:
            raise InputError(f"--trim must be one of {', '.join(defaults.TRIM_MODES)}, got {trim!r}")
        max_new = max_new_tokens if max_new_tokens is not None else self.settings.max_new_tokens
        if not 1 <= max_new <= defaults.MAX_NEW_TOKENS_LIMIT:
            raise InputError(f"--max-new-tokens must be between 1 and {defaults.MAX_NEW_TOKENS_LIMIT}, got {max_new}")
        if publish:
            check_broker(self.app)  # before anything is written: a refused submission leaves nothing
        self.ensure_schema()
        try:
            with self.sessions.begin() as session:
                batch = create_batch(
                    session,
                    model=model,
                    queue=queue or self.settings.queue or queue_for(model),
                    prompt_name=resolved.name,
                    prompt_template=resolved.template,
                    params={
                        "max_new_tokens": max_new,
                        "variants": resolved.variants,
                        "language": language,
                        "max_words": max_words,
                        "long_documents": long_documents,
                        "trim": trim,
                        "chunk_size": self.settings.chunk_size,  # the sweeper republishes in these chunks too
                    },
                    source=source,
                )
                batch.adapter = adapter
                batch.idempotency_key = idempotency_key
                accepted = _write_jobs(JobWriter(session, batch), documents, problems)
                if problems and not skip_bad_rows:
                    raise InputError(_problem_summary(source, problems), problems)
                if accepted == 0:
                    raise InputError(
                        f"{source}: no usable documents" + (f" ({len(problems)} bad rows)" if problems else ""),
                        problems,
                    )
                if before_commit is not None:  # the HTTP API records the batch's owner in the same transaction
                    before_commit(session, batch)
                batch_id = batch.id
        except IntegrityError:
            if idempotency_key is not None and (earlier := self._idempotent(idempotency_key)) is not None:
                return earlier  # a concurrent submission with the same key committed first
            raise
        except OperationalError as error:
            raise DatabaseError(f"database {hide_password(self.settings.database_url)} failed: {error.orig}") from None
        try:
            chunks = self.publish(batch_id) if publish else 0
        except (SumfleetError, SQLAlchemyError, OSError) as error:
            first = str(getattr(error, "orig", None) or error).strip().splitlines()[:1]
            raise NotPublished(
                f"batch {batch_id} is saved ({accepted} documents) but publishing it failed "
                f"({type(error).__name__}: {' '.join(first)}); it will run: a worker's sweeper publishes it "
                f"(or `sumfleet requeue {batch_id}`). Do not submit it again.",
                batch_id,
                accepted,
                list(problems),
            ) from error
        return Submission(batch_id, accepted, chunks, list(problems))

    def _idempotent(self, key: str) -> Submission | None:
        """The submission an earlier call with this idempotency key made, or None."""
        self.ensure_schema()
        with self.sessions() as session:
            batch = session.scalars(select(Batch).where(Batch.idempotency_key == key)).first()
            return None if batch is None else Submission(batch.id, batch.total, 0, [], reused=True)

    def submit_tuning(
        self,
        name: str,
        train: Iterable[tuple[str, str]],
        heldout: Iterable[tuple[str, str]],
        config: dict[str, Any],
        *,
        prompt: str | None = None,
        max_new_tokens: int = 48,
        model: str | None = None,
    ) -> str:
        """Give a tuning run to the fleet (a worker started with `--tune` trains it); returns its id."""
        model = canonical_model(model or self.settings.model)
        resolve_model(model, self.settings, need_files=False)
        check_name(name)
        resolved = resolve_prompt(self.settings.prompt if prompt is None else prompt)
        check_broker(self.app)
        self.ensure_schema()
        with self.sessions.begin() as session:
            run = create_run(
                session,
                name=name,
                model=model,
                queue=tune_queue_for(model),
                config=config,
                prompt=resolved.name if resolved.name != "custom" else resolved.template,
                max_new_tokens=max_new_tokens,
                train=train,
                heldout=heldout,
            )
            run_id, queue = run.id, run.queue
        send_tuning(self.app, run_id, queue)
        return run_id

    def tuning_status(self, run_id: str) -> dict[str, Any]:
        """A tuning run as it is now: state, step of total, last loss, the adapter it made, why it failed."""
        self.ensure_schema()
        with self.sessions() as session:
            run = get_run(session, run_id)
            return {
                "id": run.id,
                "state": run.state,
                "name": run.name,
                "model": run.model,
                "method": run.config.get("method"),
                "step": run.step,
                "total_steps": run.total_steps,
                "loss": run.loss,
                "adapter": run.adapter,
                "error": run.error,
                "worker": run.worker,
                "created_at": _iso(run.created_at),
                "started_at": _iso(run.started_at),
                "finished_at": _iso(run.finished_at),
            }

    def publish(self, batch_id: str) -> int:
        """(Re)publish the batch's queued jobs as chunk messages; returns the number of chunks."""
        return publish_batch(self.app, self.sessions, batch_id, self.settings.chunk_size)

    # -- reading ---------------------------------------------------------------------------

    def status(self, batch_id: str) -> BatchStatus:
        """The batch's counts, and a warning when it is unfinished and no live worker consumes its queue."""
        self.ensure_schema()
        with self.sessions() as session:
            batch = get_batch(session, batch_id)
            unserved = not BatchState(batch.state).finished and live_on(session, batch.queue) == 0
            warning = nobody_serves(batch.model, batch.queue) if unserved else None
            return BatchStatus.of(batch, counts_of(batch).by_state, warning)

    def workers(self) -> list[dict[str, Any]]:
        """The worker registry: every recorded worker process, `state` live, stale or stopped."""
        self.ensure_schema()
        now = datetime.now(UTC)
        with self.sessions() as session:
            found = registered_workers(session)
            return [
                {
                    "id": w.id,
                    "state": "stopped" if w.stopped_at else "live" if is_live(w, now) else "stale",
                    "model": w.model,
                    "queue": w.queue,
                    "device": w.device,
                    "dtype": w.dtype,
                    "version": w.version,
                    "started_at": _iso(w.started_at),
                    "heartbeat_age": (now - as_utc(w.heartbeat_at)).total_seconds(),
                    "documents": w.documents,
                    "current_batch": w.current_batch,
                }
                for w in found
            ]

    def batches(self, limit: int = 50, before: str | None = None) -> list[BatchStatus]:
        """The newest batches first; `before` a batch id: the page after it."""
        self.ensure_schema()
        with self.sessions() as session:
            return [BatchStatus.of(b, counts_of(b).by_state) for b in list_batches(session, limit, before)]

    def verify(self, batch_id: str, *, repair: bool = False) -> list[str]:
        """Where the batch's counters disagree with a recount of its jobs (one line each; empty: they
        agree); `repair` then sets them to the recount. Scans the batch's jobs: a check, not a status."""
        self.ensure_schema()
        with self.sessions.begin() as session:
            counted = recount(session, batch_id)
            wrong = differences(counts_of(get_batch(session, batch_id)), counted)
            if wrong and repair:
                repair_counters(session, batch_id, counted)
        return wrong

    def prune(self, finished_before: datetime) -> tuple[int, int]:
        """Delete the batches that ended before `finished_before`, with their jobs, in bounded
        transactions; returns (batches, jobs) deleted."""
        self.ensure_schema()
        return prune_finished(self.sessions, finished_before)

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """Result rows in submission order, streamed from the database."""
        self.ensure_schema()
        with self.sessions() as session:
            adapter = get_batch(session, batch_id).adapter
            for job in iter_results(session, batch_id):
                yield result_row(job, adapter)

    def references(
        self, batch_id: str, reference_field: str, group_field: str | None
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(result row, {reference, document, group}) per job, the references from the input's own fields."""
        self.ensure_schema()
        with self.sessions() as session:
            get_batch(session, batch_id)
            for job in iter_results(session, batch_id, with_text=True):
                meta = job.meta or {}
                yield (
                    result_row(job),
                    {
                        "reference": meta.get(reference_field),
                        "document": job.text,
                        "group": meta.get(group_field) if group_field else None,
                    },
                )

    def cancel(self, batch_id: str) -> tuple[int, int]:
        """Stop a batch: queued jobs are cancelled, running ones finish; returns (cancelled, running)."""
        self.ensure_schema()
        with self.sessions.begin() as session:
            return cancel_batch(session, batch_id)

    def wait(self, batch_id: str, timeout: float | None = None, poll: float = 1.0) -> BatchStatus:
        """Block until the batch has ended and none of its jobs still runs (a cancelled batch's running
        jobs stop after their generation batch); returns its final status. After `timeout` seconds
        raises `models.errors.WaitTimeout` (a `SumfleetError` and a `TimeoutError`) naming the batch,
        its state and counts; the batch keeps running, so waiting again is fine."""
        from models.errors import WaitTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(batch_id)
            if status.done and not status.counts.get("running"):
                return status
            if deadline is not None and time.monotonic() >= deadline:
                counts = ", ".join(f"{state} {n}" for state, n in status.counts.items() if n) or "no jobs"
                raise WaitTimeout(
                    f"batch {batch_id} has not ended after {timeout:g}s: {status.state}, "
                    f"{status.finished}/{status.total} done ({counts}); it keeps running, wait again or check "
                    f"`sumfleet status {batch_id}`",
                    batch_id,
                    status,
                )
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def close(self) -> None:
        self.database.dispose()


def submit(documents: Iterable[str | Mapping[str, Any]], **options: Any) -> Submission:
    """Submit documents with settings from the environment (see `Client.submit`)."""
    client = Client()
    try:
        return client.submit(documents, **options)
    finally:
        client.close()


def _write_jobs(writer: JobWriter, documents: Iterable[Document], problems: list[RowProblem]) -> int:
    """Write every document as a job; an id seen before becomes a bad row. Returns the jobs written."""
    for document in documents:
        duplicate = writer.add(
            document.id, document.text, line=document.line, meta=document.meta, request=document.request
        )
        if duplicate is not None:
            reason = duplicate_reason(document.id, document.source, duplicate.first_line)
            problems.append(RowProblem(document.source, document.line, reason))
    return writer.close()


def _problem_summary(source: str, problems: list[RowProblem], shown: int = 20) -> str:
    lines = [f"{source}: {len(problems)} bad row(s); nothing was submitted (use --skip-bad-rows to skip them)"]
    lines += [f"  {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else as_utc(moment).isoformat()
