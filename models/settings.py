"""One typed settings object, built once (from flags and `SUMFLEET_*` env) and passed explicitly."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import defaults
from models.errors import ConfigError


class Settings(BaseSettings):
    """Everything an operator can set. Env names are `SUMFLEET_` + the field name in capitals."""

    model_config = SettingsConfigDict(env_prefix="SUMFLEET_", extra="forbid")

    database_url: str = Field(
        defaults.DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the store (SQLite, or postgresql+psycopg://...)"
    )
    broker_url: str = Field(defaults.DEFAULT_BROKER_URL, description="Redis URL carrying the chunk messages")
    model: str = Field(
        defaults.DEFAULT_MODEL,
        description="smollm2 (bundled), lead or lead-N (extractive), a local directory or .gguf file, "
        "a Hugging Face id in the local cache, or python:package.module:factory",
    )
    prompt: str = Field(
        defaults.DEFAULT_PROMPT, description="prompt template name (`sumfleet prompts`) or text with {document}"
    )
    queue: str | None = Field(
        None, description="queue to publish to / consume instead of the model's own (sumfleet.<model>)"
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description=f"job ids per chunk message (one Celery task) (unset: by batch size, "
        f"{defaults.CHUNK_SIZE_MIN}-{defaults.CHUNK_SIZE_MAX})",
    )
    max_new_tokens: int = Field(
        defaults.MAX_NEW_TOKENS,
        ge=1,
        le=defaults.MAX_NEW_TOKENS_LIMIT,
        description=f"tokens generated per summary (1-{defaults.MAX_NEW_TOKENS_LIMIT}); a batch's own value wins",
    )
    engine: str = Field(
        "auto",
        pattern="^(auto|transformers|llama.cpp|lead|vllm|ctranslate2)$",
        description="what runs the model: transformers, llama.cpp (GGUF files, CPU), ctranslate2, vllm, "
        "lead (extractive), or auto (see worker/loading.py)",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=f"rows per generate() call at most (unset: {defaults.MAX_BATCH_SIZE_CPU} on CPU, "
        f"{defaults.MAX_BATCH_SIZE_CPU_BF16} on CPU in bf16, {defaults.MAX_BATCH_SIZE_GPU} on GPU)",
    )
    token_budget: int | None = Field(
        None,
        ge=64,
        description="(longest prompt + max new tokens) x rows per generate() call (unset: "
        f"{defaults.TOKEN_BUDGET_CPU} on CPU, {defaults.TOKEN_BUDGET_CPU_BF16} on CPU in bf16, "
        f"{defaults.TOKEN_BUDGET_GPU} on GPU); halved for the rest of a chunk on out-of-memory",
    )
    batching: str = Field(
        "auto",
        pattern="^(auto|static|continuous)$",
        description="continuous: rows join a running batch as others finish (llama.cpp's KV streams, "
        "transformers' generate_batch); static: packed calls that run to their longest row; auto: "
        "continuous where it is measured faster (llama.cpp, vLLM), static for transformers",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="SUMFLEET_ENGINE=vllm: share of the GPU's memory vLLM takes (weights and KV cache)"
    )
    vllm_kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="SUMFLEET_ENGINE=vllm: GiB of KV cache (unset: what vllm_gpu_memory_utilization leaves on a GPU; "
        "on vLLM's CPU build VLLM_CPU_KVCACHE_SPACE, else 1)",
    )
    vllm_max_model_len: int | None = Field(
        None, ge=64, description="SUMFLEET_ENGINE=vllm: positions per sequence (unset: the model's own context)"
    )
    vllm_enforce_eager: bool = Field(
        False, description="SUMFLEET_ENGINE=vllm: no torch.compile or CUDA graphs (starts in seconds, runs slower)"
    )
    ct2_compute_type: str = Field(
        "auto",
        pattern="^(auto|int8|int8_float32|int8_bfloat16|bfloat16|float32)$",
        description="SUMFLEET_ENGINE=ctranslate2: what the converted weights and kernels compute in (auto: int8 "
        "on CPUs, bf16 on GPUs; a type the device lacks falls back, logged)",
    )
    llamacpp_weights: str = Field(
        "auto",
        pattern="^(auto|as-is|f16|bf16|q8_0|q4_0|f32)$",
        description="SUMFLEET_ENGINE=llama.cpp: the GGUF weight type it runs, converted once and cached (auto: a "
        "Q4_1 model of up to 1 B parameters becomes bf16 where the CPU and llama.cpp's build have AVX-512 BF16, "
        "f16 on other CPUs with AVX2 and F16C or on ARM, where llama.cpp has fast kernels for them and none for "
        "Q4_1, unless its AMX kernels run the file as it is; anything else as it is)",
    )
    llamacpp_flash_attention: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="SUMFLEET_ENGINE=llama.cpp: flash attention (auto: both ways timed at the first load on "
        "this machine, 3-8 s on 2 cores, and the faster kept under the cache; off was 1.39x faster on a Xeon "
        "with AMX, on 1.24x faster on an AMD EPYC with AVX-512)",
    )
    cache_dir: str | None = Field(
        None, description="where GGUF models are cached as plain checkpoints (unset: ~/.cache/sumfleet/checkpoints)"
    )
    cache_checkpoints: bool = Field(True, description="cache de-quantized GGUF models as plain checkpoints")
    adapter_dir: str | None = Field(
        None,
        description="where tuned adapters are stored (unset: ~/.local/share/sumfleet/adapters; share it with workers)",
    )
    max_input_tokens: int | None = Field(
        None,
        ge=64,
        description=f"usable context per prompt (unset: the model's, less the output, at most "
        f"{defaults.MAX_INPUT_TOKENS_CPU} on CPU)",
    )
    long_documents: str = Field(
        "map-reduce",
        pattern="^(map-reduce|truncate)$",
        description="documents over the context: map-reduce (summarize pieces, then their summaries) or truncate",
    )
    trim: str = Field(
        "sentence",
        pattern="^(sentence|none)$",
        description="a summary that hit max_new_tokens: sentence (cut back to its last complete sentence, if it "
        "has one) or none (kept as generated); --trim per batch",
    )
    max_document_chars: int = Field(defaults.MAX_DOCUMENT_CHARS, ge=1, description="longer documents are bad rows")
    dtype: str = Field(
        "auto",
        pattern="^(auto|float32|bfloat16|float16)$",
        description="auto: bf16 on CUDA with bf16 and on CPUs with AMX/AVX-512 BF16, fp16 on older GPUs, else float32",
    )
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:N")
    threads: int | None = Field(
        None, ge=1, description="CPU threads per worker process (unset: the cores divided among its processes)"
    )
    allow_download: bool = Field(False, description="let transformers download models from the Hub")
    task_time_limit: int = Field(
        defaults.TASK_TIME_LIMIT,
        ge=1,
        description="seconds a worker process may go without generation progress before it is ended "
        "(a chunk may run longer while it progresses)",
    )
    visibility_timeout: int = Field(
        defaults.VISIBILITY_TIMEOUT,
        ge=1,
        description="seconds before Redis redelivers an unacknowledged chunk; must exceed the task time limit",
    )
    max_attempts: int = Field(
        defaults.MAX_ATTEMPTS, ge=1, le=100, description="a job whose worker died this many times ends failed"
    )
    lease_grace: int = Field(
        defaults.LEASE_GRACE,
        ge=0,
        description="a job's lease lasts the task time limit plus this, renewed while generation progresses",
    )
    tune_lease: int = Field(
        defaults.TUNE_LEASE, ge=1, description="seconds a tuning run's lease lasts (each training step renews it)"
    )
    sweep_interval: float = Field(defaults.SWEEP_INTERVAL, gt=0, description="seconds between sweeps")
    republish_after: float = Field(
        defaults.REPUBLISH_AFTER,
        gt=0,
        description="queued jobs of an empty queue published longer ago than this (seconds) are republished",
    )
    retention_days: float | None = Field(
        None, gt=0, description="the API deletes batches this many days after they ended (unset: kept until pruned)"
    )
    api_max_upload_bytes: int = Field(
        defaults.API_MAX_UPLOAD_BYTES, ge=1, description="largest HTTP request body (upload or inline JSON); 413 above"
    )
    api_max_documents: int = Field(
        defaults.API_MAX_DOCUMENTS, ge=1, description="documents (native) or requests (OpenAI file) per HTTP batch"
    )
    api_models: str | None = Field(
        None, description="models the HTTP API accepts, comma-separated (unset: SUMFLEET_MODEL and lead)"
    )
    api_poll_interval: float = Field(
        defaults.API_POLL_INTERVAL, gt=0, description="seconds between the API's passes (end batches, expire, deliver)"
    )
    api_webhook_attempts: int = Field(
        defaults.WEBHOOK_ATTEMPTS, ge=1, le=100, description="tries per webhook before it is given up"
    )
    api_webhook_backoff: float = Field(
        defaults.WEBHOOK_BACKOFF, gt=0, description="seconds before the first webhook retry, doubled each time"
    )
    api_webhook_private: bool = Field(
        False, description="allow callback URLs on loopback, private and link-local addresses"
    )
    api_webhook_timeout: float = Field(
        defaults.WEBHOOK_TIMEOUT, gt=0, description="seconds a webhook receiver has to answer"
    )
    api_rate_limit_per_minute: int | None = Field(
        None,
        ge=0,
        description="requests per minute per API key, shared by all API processes; 429 above (unset or 0: "
        "unlimited; `sumfleet keys create --requests-per-minute` sets a key's own)",
    )
    api_documents_per_day: int | None = Field(
        None,
        ge=0,
        description="documents (or batch requests) an API key may submit per UTC day; a batch that would pass "
        "it is refused whole with 429 (unset or 0: unlimited)",
    )
    api_batches_in_flight: int | None = Field(
        None,
        ge=0,
        description="batches an API key may have validating, running or finishing at once; 429 above "
        "(unset or 0: unlimited)",
    )
    api_file_ttl_seconds: int | None = Field(
        None,
        ge=1,
        description="uploaded files without `expires_after` expire this many seconds after upload, and are "
        "deleted (unset: kept until deleted)",
    )
    api_validate_async_bytes: int | None = Field(
        1_048_576,
        ge=0,
        description="a batch whose input file is larger than this is answered at once as `validating` and "
        "checked in the background (unset: every file is checked before the answer)",
    )

    @model_validator(mode="after")
    def _timeouts(self) -> Settings:
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


def hide_password(url: str) -> str:
    """`url` with its password replaced by ***, for messages and logs (database and broker URLs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def settings_help() -> str:
    """Every setting as `SUMFLEET_NAME  description (default: ...)`, one per line, for `--help`."""
    lines = ["configuration (flags win over environment variables):"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "" if default is None else f" (default: {_shown(default)})"
        lines.append(f"  SUMFLEET_{name.upper():<22} {field.description}{shown}")
    return "\n".join(lines) + "\n"


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
