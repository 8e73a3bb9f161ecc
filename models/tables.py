"""The tables: `batches` (one per submission) and `jobs` (one per document), and the HTTP API's."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from models.states import BatchState, JobState

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
JobId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base of sumfleet's tables."""


class Batch(Base):
    """One submission: a corpus, the model and prompt it runs with, and its progress."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_created", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=BatchState.QUEUED.value, index=True)
    model: Mapped[str] = mapped_column(String(512))
    queue: Mapped[str] = mapped_column(String(255))
    prompt_name: Mapped[str] = mapped_column(String(255))
    prompt_template: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # when its queued jobs were last put on the broker (the sweeper republishes lost ones)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    adapter: Mapped[str | None] = mapped_column(String(80), nullable=True)  # name@version of its adapter, if any
    # a retried submission with the same key gets this batch (the API prefixes the key's owner)
    idempotency_key: Mapped[str | None] = mapped_column(String(300), nullable=True, unique=True)
    # counters, changed in the same transaction as the job rows they count (never a scan of jobs)
    jobs_queued: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    jobs_running: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    jobs_succeeded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    jobs_cancelled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    tokens_prompt: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of succeeded jobs
    tokens_output: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Job(Base):
    """One document of a batch, and its outcome."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "doc_id", name="uq_jobs_batch_doc"),
        Index("ix_jobs_batch_state_id", "batch_id", "state", "id"),  # a state's jobs in id order
        Index("ix_jobs_batch_id", "batch_id", "id"),  # all of a batch's jobs in id order
    )

    id: Mapped[int] = mapped_column(JobId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    doc_id: Mapped[str] = mapped_column(String(512))
    line: Mapped[int | None] = mapped_column(Integer, nullable=True)  # where it was in its input (None: no lines)
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_variant: Mapped[str | None] = mapped_column(String(16), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    generation_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # long documents: how many pieces the document was split into, and how many summarizing levels ran
    pieces: Mapped[int | None] = mapped_column(Integer, nullable=True)
    levels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # why generation of the (final) summary stopped: "stop" (the model ended it) or "length" (max_new_tokens)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # quality warnings on the output: ["empty", "echo", "repetition", "truncated"] (models.quality); [] none
    warnings: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    # a job that carries its own request instead of a document for the batch's template:
    # {"messages": [{"role", "content"}...], "max_new_tokens": int, "temperature": float}
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # a running job whose lease has expired lost its worker: another delivery may take it over
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Adapter(Base):
    """A tuned adapter of a base model (a soft prompt or a LoRA): one version of a name.

    Its weights live under SUMFLEET_ADAPTER_DIR at `path`; the row records how it was made and
    how it scored on held-out documents, so a batch can name it and a result can say which one ran.
    """

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_adapters_name_version"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(512))  # the canonical model name it was tuned on
    method: Mapped[str] = mapped_column(String(32))  # prompt-tuning or lora
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # hyper-parameters, template
    data_fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of the training pairs, in order
    train_examples: Mapped[int] = mapped_column(Integer, default=0)
    scores: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, nullable=True
    )  # held-out ROUGE: zero-shot, adapter, Lead-3
    path: Mapped[str] = mapped_column(Text)  # relative to SUMFLEET_ADAPTER_DIR
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TuningRun(Base):
    """A tuning job given to the fleet (`sumfleet tune --submit`): a worker with `--tune` trains it.

    Its lease is renewed as training advances; a run whose lease ran out lost its worker and is
    published again, to resume from its last checkpoint.
    """

    __tablename__ = "tuning_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))  # the adapter it makes (a new version of it)
    model: Mapped[str] = mapped_column(String(512))
    queue: Mapped[str] = mapped_column(String(255))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # TuneConfig's fields
    prompt: Mapped[str] = mapped_column(Text)
    max_new_tokens: Mapped[int] = mapped_column(Integer)  # per held-out summary
    state: Mapped[str] = mapped_column(String(16), index=True)  # queued, running, completed, failed
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)  # of the last step
    adapter: Mapped[str | None] = mapped_column(String(80), nullable=True)  # name@version, once made
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TuningExample(Base):
    """A training (or held-out) pair of a tuning run, in order."""

    __tablename__ = "tuning_examples"

    run_id: Mapped[str] = mapped_column(ForeignKey("tuning_runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    document: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)
    heldout: Mapped[bool] = mapped_column(Boolean, default=False)


# --- the HTTP API (producer/api): keys, files, API batch records, webhook deliveries ---------


class ApiKey(Base):
    """An API key: the secret is stored as its SHA-256 only; the webhook secret signs deliveries."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    secret_prefix: Mapped[str] = mapped_column(String(32))  # the first characters, to tell keys apart
    webhook_secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # limits of this key: None follows the server's setting (SUMFLEET_API_...), 0 is unlimited
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    documents_per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    batches_in_flight: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # the request token bucket, shared by every API process: its level, and when (Unix seconds) it was last counted
    rate_tokens: Mapped[float | None] = mapped_column(Float, nullable=True)
    rate_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # documents submitted on `documents_day` (UTC); a submission on a later day starts the count again
    documents_day: Mapped[date | None] = mapped_column(Date, nullable=True)
    documents_used: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ApiFile(Base):
    """A file of the OpenAI-compatible API: an upload (its bytes in `api_file_chunks`), or the
    output or error file of a batch (generated from the batch's jobs when read)."""

    __tablename__ = "api_files"
    __table_args__ = (Index("ix_api_files_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(16))  # upload, output, error
    purpose: Mapped[str] = mapped_column(String(32))  # batch (uploads), batch_output (generated)
    filename: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes
    api_batch_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # generated files: their batch
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # gone for its owner from then on; the background pass deletes it (never while a batch validates it)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)


class ApiFileChunk(Base):
    """A piece of an uploaded file, in order (uploads and downloads stream; nothing holds a whole file)."""

    __tablename__ = "api_file_chunks"

    file_id: Mapped[str] = mapped_column(ForeignKey("api_files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ApiBatch(Base):
    """A batch created over HTTP: who owns it, its OpenAI status and timestamps, its webhook.

    `kind` is `openai` (id `batch_...`, from an uploaded request file) or `native` (the id of
    the underlying `batches` row). `batch_id` is None when no request of the file was runnable.
    """

    __tablename__ = "api_batches"
    __table_args__ = (Index("ix_api_batches_owner_kind_created", "owner", "kind", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    end_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)  # expired: the window ran out
    endpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    input_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    completion_window: Mapped[str | None] = mapped_column(String(16), nullable=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # OpenAI's `metadata`
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)  # validation errors
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # seconds its output and error files live after they are made (OpenAI's `output_expires_after`)
    output_expires_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # while `validating`: until when the process reading its input file holds it (it renews this as it reads);
    # past it, any API process takes the validation over
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ApiRejection(Base):
    """A request of an OpenAI batch file refused on its own (bad body): it goes to the error file."""

    __tablename__ = "api_rejections"

    id: Mapped[int] = mapped_column(JobId, primary_key=True, autoincrement=True)
    api_batch_id: Mapped[str] = mapped_column(ForeignKey("api_batches.id", ondelete="CASCADE"), index=True)
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    status_code: Mapped[int] = mapped_column(Integer)
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    param: Mapped[str | None] = mapped_column(String(255), nullable=True)


class WebhookDelivery(Base):
    """One webhook call owed for a batch that ended; retried with backoff until delivered."""

    __tablename__ = "api_webhook_deliveries"
    __table_args__ = (Index("ix_api_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_batch_id: Mapped[str] = mapped_column(ForeignKey("api_batches.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the exact body sent (signed anew, with a fresh timestamp, per attempt)
    state: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # when it may be sent next; while an attempt is in flight, when that attempt's claim runs out
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WorkerRecord(Base):
    """A worker process, as it reports itself: what it serves and a heartbeat every few seconds."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid, as in jobs.worker
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(512))
    queue: Mapped[str] = mapped_column(String(255), index=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)  # cpu, cuda:0, ...
    dtype: Mapped[str | None] = mapped_column(String(32), nullable=True)
    version: Mapped[str] = mapped_column(String(32))  # sumfleet's version
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    documents: Mapped[int] = mapped_column(BigInteger, default=0)  # finished by this process
    current_batch: Mapped[str | None] = mapped_column(String(32), nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
