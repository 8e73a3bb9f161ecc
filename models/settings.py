"""One typed settings object, built once (from flags and `SUMFLEET_*` env) and passed explicitly."""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import defaults
from models.errors import ConfigError


class Settings(BaseSettings):
    """Everything an operator can set. Env names are `SUMFLEET_` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="SUMFLEET_", extra="forbid")

    database_url: str = Field(defaults.DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the store")
    broker_url: str = Field(defaults.DEFAULT_BROKER_URL, description="Celery broker URL (Redis)")
    model: str = Field(defaults.DEFAULT_MODEL, description="model name, HF id or local directory")
    prompt: str = Field(defaults.DEFAULT_PROMPT, description="prompt template name or text")
    queue: str | None = Field(None, description="queue to use instead of the model's own")
    chunk_size: int = Field(defaults.CHUNK_SIZE, ge=1, le=10_000, description="job ids per chunk")
    max_new_tokens: int = Field(
        defaults.MAX_NEW_TOKENS, ge=1, le=defaults.MAX_NEW_TOKENS_LIMIT, description="tokens per summary"
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=4096, description="docs per generate() (default: 8 on CPU, 128 on GPU)"
    )
    token_budget: int | None = Field(
        None, ge=64, description="padded tokens per generate() (default: per device, see defaults)"
    )
    batching: str = Field("static", pattern="^(static|continuous)$", description="generation scheduler")
    cache_dir: str | None = Field(None, description="where de-quantized GGUF checkpoints are cached")
    cache_checkpoints: bool = Field(True, description="cache GGUF models as plain checkpoints")
    max_input_tokens: int | None = Field(
        None, ge=64, description="usable context per prompt (default: the model's, capped at 2048 on CPU)"
    )
    long_documents: str = Field(
        "map-reduce", pattern="^(map-reduce|truncate)$", description="what to do with documents over the context"
    )
    max_document_chars: int = Field(defaults.MAX_DOCUMENT_CHARS, ge=1, description="longest document")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$", description="model dtype")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N")
    allow_download: bool = Field(False, description="let transformers fetch models from the Hub")
    task_time_limit: int = Field(defaults.TASK_TIME_LIMIT, ge=1, description="seconds per chunk")
    visibility_timeout: int = Field(defaults.VISIBILITY_TIMEOUT, ge=1, description="Redis redelivery")
    max_attempts: int = Field(defaults.MAX_ATTEMPTS, ge=1, le=100, description="tries before a job fails")
    lease_grace: int = Field(defaults.LEASE_GRACE, ge=0, description="seconds a lease outlives the time limit")
    sweep_interval: float = Field(defaults.SWEEP_INTERVAL, gt=0, description="seconds between sweeps")
    republish_after: float = Field(
        defaults.REPUBLISH_AFTER, gt=0, description="seconds before unclaimed queued jobs are republished"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's own)")
    api_max_upload_bytes: int = Field(
        defaults.API_MAX_UPLOAD_BYTES, ge=1, description="largest HTTP request body (uploads, inline documents)"
    )
    api_max_documents: int = Field(defaults.API_MAX_DOCUMENTS, ge=1, description="documents or requests per HTTP batch")
    api_models: str | None = Field(
        None, description="comma-separated models the HTTP API accepts (default: SUMFLEET_MODEL and lead)"
    )
    api_poll_interval: float = Field(
        defaults.API_POLL_INTERVAL, gt=0, description="seconds between the API's finalize/expiry/webhook passes"
    )
    api_webhook_attempts: int = Field(defaults.WEBHOOK_ATTEMPTS, ge=1, le=100, description="tries per webhook")
    api_webhook_backoff: float = Field(defaults.WEBHOOK_BACKOFF, gt=0, description="seconds before the first retry")
    api_webhook_private: bool = Field(
        False, description="allow webhooks to loopback, private and link-local addresses"
    )
    api_webhook_timeout: float = Field(defaults.WEBHOOK_TIMEOUT, gt=0, description="seconds per webhook attempt")

    @model_validator(mode="after")
    def _timeouts(self) -> "Settings":
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed task_time_limit "
                f"({self.task_time_limit}s), or Redis redelivers a chunk that is still running"
            )
        return self


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with `overrides` (flags) winning; None means unset."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as error:
        lines = []
        for err in error.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"SUMFLEET_{field.upper()}" if field != "settings" else "settings"
            lines.append(f"{env}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
