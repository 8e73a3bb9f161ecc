"""Request and response bodies of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models import defaults

# --- OpenAI-compatible ----------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class BatchCreate(BaseModel):
    """`POST /v1/batches`. `callback_url` (or a `callback_url` metadata key) asks for a webhook."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(description="an uploaded file (purpose batch) of this key")
    endpoint: str = Field(description="only /v1/chat/completions")
    completion_window: str = Field(description='"24h", or any "<N>h" from 1h to 168h; unfinished requests then expire')
    metadata: dict[str, str] | None = Field(
        None, description="up to 16 pairs; keys up to 64, values up to 512 characters"
    )
    output_expires_after: dict[str, Any] | None = Field(
        None,
        description='`{"anchor": "created_at", "seconds": N}` (3600-2592000): the output and error files expire N '
        "seconds after they are made (unset: kept until deleted)",
    )
    callback_url: str | None = Field(
        None, description="sumfleet extension: POSTed the batch object, signed, when it ends"
    )


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorItem(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None
    warning: str | None = Field(None, description="sumfleet's: e.g. no live worker serves the batch's model")


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


# --- native -----------------------------------------------------------------------------------------


class SummaryOptions(BaseModel):
    """Model, prompt and generation settings of a native batch (unset: the server's settings)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=512, description="a model the server accepts (SUMFLEET_API_MODELS)")
    prompt: str | None = Field(
        None,
        max_length=100_000,
        description="template name (one-sentence, headline, bullets, paragraph, tldr) or text with {document}",
    )
    max_new_tokens: int | None = Field(None, ge=1, le=defaults.MAX_NEW_TOKENS_LIMIT, description="tokens per summary")
    language: str | None = Field(
        None,
        max_length=16,
        description="prompt variant and {language}: auto (per document) or an ISO 639-1 code (fr, de, zh, ...)",
    )
    max_words: int | None = Field(None, ge=1, le=10_000, description="fills {max_words}")
    long_documents: Literal["map-reduce", "truncate"] | None = Field(
        None, description="documents over the model's context"
    )
    trim: Literal["sentence", "none"] | None = Field(
        None,
        description="a summary that hit max_new_tokens: cut back to its last complete sentence (sentence, the "
        "default) or kept as generated (none)",
    )
    callback_url: str | None = Field(
        None, max_length=2048, description="POSTed the batch object, signed, when the batch ends"
    )
    adapter: str | None = Field(
        None, max_length=80, description="a tuned adapter of the model, NAME or NAME@VERSION (`sumfleet adapters`)"
    )
    skip_bad_rows: bool = Field(
        False, description="submit the good documents and list the bad ones instead of refusing all"
    )


class SummaryCreate(SummaryOptions):
    """`POST /api/v1/batches`: documents inline, each a string or an object with `text` (or
    `document`) and an optional `id`; other fields are kept with the job."""

    documents: list[str | dict[str, Any]] = Field(min_length=1)


class SummaryBatch(BaseModel):
    id: str
    object: Literal["summary_batch"] = "summary_batch"
    state: Literal["queued", "running", "completed", "cancelled"]
    model: str
    prompt: str
    adapter: str | None = Field(None, description="the tuned adapter it runs with, name@version")
    source: str | None
    total: int
    counts: dict[str, int] = Field(description="jobs per state: queued, running, succeeded, failed, cancelled")
    docs_per_second: float | None
    eta_seconds: float | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    callback_url: str | None
    results_url: str
    warning: str | None = Field(
        None, description="e.g. that no live worker serves the batch's model, and how to start one"
    )


class SummaryCreated(SummaryBatch):
    accepted: int = Field(description="documents queued")
    skipped: list[str] = Field(
        default_factory=list, description="bad documents skipped (skip_bad_rows), with where and why"
    )


class SummaryBatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SummaryBatch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    database: Literal["ok"]
    broker: Literal["ok"]
