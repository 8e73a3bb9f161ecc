"""The `sumfleet` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from models import defaults
from models.errors import ConfigError, InputError, NotPublished, SumfleetError
from models.settings import Settings, hide_password, load_settings, settings_help
from producer.inputs import FORMATS as INPUT_FORMATS

if TYPE_CHECKING:
    from producer.client import Client

ENV_HELP = settings_help()  # every SUMFLEET_* setting, from the one settings object
EXIT_WATCH_TIMEOUT = 5  # status --watch --timeout: the batch had not ended in time
EXIT_SAVED_NOT_PUBLISHED = 4  # submit: the batch is saved and will run, but its messages are not yet published


def _connection_flags(parser: argparse.ArgumentParser, broker: bool = False) -> None:
    parser.add_argument("--database-url", help="store URL (env SUMFLEET_DATABASE_URL)")
    if broker:
        parser.add_argument("--broker-url", help="broker URL (env SUMFLEET_BROKER_URL)")


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name (env SUMFLEET_MODEL; default smollm2, the bundled model)")
    parser.add_argument("--prompt", help="template name (see `sumfleet prompts`) or text containing {document}")
    parser.add_argument("--prompt-file", help="read the prompt template from this file")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per summary (default 64)")
    parser.add_argument(
        "--language", help="prompt variant: auto (per document, the default) or an ISO 639-1 code (fr, de, zh, ...)"
    )
    parser.add_argument("--max-words", type=int, help="fills {max_words} in templates (default 50)")
    parser.add_argument(
        "--long-documents",
        choices=["map-reduce", "truncate"],
        help="documents over the model's context: summarize pieces then their summaries (map-reduce, "
        "the default) or cut them (truncate)",
    )
    parser.add_argument(
        "--trim",
        choices=list(defaults.TRIM_MODES),
        help="a summary that hit --max-new-tokens: cut it back to its last complete sentence (sentence, the "
        "default; kept as is when it has none) or keep it as generated (none); env SUMFLEET_TRIM",
    )
    parser.add_argument("--adapter", help="a tuned adapter, NAME or NAME@VERSION (see `sumfleet adapters`)")


def _input_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        help="JSONL, CSV/TSV or Parquet file, a directory of .txt/.md files, the folder of a Hugging Face dataset "
        "saved with save_to_disk (of a DatasetDict: the split's folder, e.g. corpus/train), or - for stdin",
    )
    parser.add_argument(
        "--format",
        dest="input_format",
        choices=list(INPUT_FORMATS),
        help="input format (default: from the extension; a directory holding state.json, dataset_info.json or "
        "dataset_dict.json is hf, a saved Hugging Face dataset, any other directory dir)",
    )
    parser.add_argument(
        "--text-field",
        help="JSON key or CSV/Parquet/dataset column with the text (default: text, document; "
        "for columns also article, content, body, case-insensitively)",
    )
    parser.add_argument(
        "--id-field",
        help='JSON key or CSV/Parquet/dataset column with the id, then required in every row (default: "id" if any)',
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip bad rows (and list them) instead of rejecting the input"
    )
    parser.add_argument("--chunk-size", type=int, help="job ids per chunk (default: by batch size, 16-256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sumfleet",
        description="Summarize whole corpora with language models: embedded (`run`) or on a "
        "Redis/Celery worker fleet with results in SQL (`submit`, `worker`, `status`, `results`).",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=ENV_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = command("run", "summarize a corpus in this process (no servers; SQLite by default)")
    _input_flags(run)
    _generation_flags(run)
    _connection_flags(run)
    run.add_argument("-o", "--output", default="-", help="results file: .jsonl, .csv or .parquet (default: stdout)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    submit = command("submit", "queue a corpus for the workers; prints the batch id")
    _input_flags(submit)
    _generation_flags(submit)
    _connection_flags(submit, broker=True)
    submit.add_argument("--queue", help="queue to publish to (default: the model's own)")
    submit.add_argument(
        "--idempotency-key",
        help="a retry with the same key prints the first batch instead of submitting the corpus again",
    )

    worker = command("worker", "run a Celery worker that loads the model once and processes chunks")
    _connection_flags(worker, broker=True)
    worker.add_argument("--model", help="model this worker serves (env SUMFLEET_MODEL)")
    worker.add_argument("--queue", help="queue to consume (default: the model's own)")
    worker.add_argument("-c", "--concurrency", type=int, default=1, help="worker processes (one model each)")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo"], help="Celery pool")
    worker.add_argument("-l", "--loglevel", default="INFO", help="Celery log level")
    worker.add_argument(
        "-n", "--hostname", help="Celery node name (default sumfleet.<model>@<host>: `celery inspect ping -d` finds it)"
    )
    worker.add_argument("-E", "--task-events", action="store_true", help="send Celery task events (for Flower)")
    worker.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object a line")
    worker.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on this port (all of this worker's processes)"
    )
    worker.add_argument("--tune", action="store_true", help="also train the tuning runs given to this model's fleet")

    status = command("status", "counts per state, docs/s and ETA of a batch")
    status.add_argument("batch", help="batch id")
    status.add_argument("--watch", action="store_true", help="show a live progress bar until the batch ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --watch")
    status.add_argument(
        "--timeout", type=float, help=f"with --watch: give up after this many seconds (exit {EXIT_WATCH_TIMEOUT})"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--verify", action="store_true", help="also recount the batch's jobs and compare with its counters"
    )
    status.add_argument("--repair", action="store_true", help="with --verify: set wrong counters to the recount")
    _connection_flags(status)

    batches = command("batches", "list batches, newest first")
    batches.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    batches.add_argument("--json", action="store_true", help="print JSON lines")
    batches.add_argument("--before", metavar="BATCH", help="the page after this batch (the last one listed)")
    _connection_flags(batches)

    workers = command("workers", "list the worker processes of the registry: live, stale, stopped")
    workers.add_argument("--json", action="store_true", help="print JSON lines")
    workers.add_argument("--live", action="store_true", help="only the live ones")
    _connection_flags(workers)

    results = command("results", "export a batch's results (streamed)")
    results.add_argument("batch", help="batch id")
    results.add_argument("-o", "--output", default="-", help="file: .jsonl, .csv or .parquet (default: stdout)")
    results.add_argument(
        "--format",
        dest="output_format",
        choices=["jsonl", "csv", "parquet"],
        help="output format (default: by extension)",
    )
    _connection_flags(results)

    cancel = command("cancel", "cancel a batch: queued jobs never run, running ones finish, results are kept")
    cancel.add_argument("batch", help="batch id")
    _connection_flags(cancel)

    requeue = command("requeue", "publish queued jobs (and those of dead workers) again, after the broker lost them")
    requeue.add_argument("batch", nargs="?", help="batch id (default: every unfinished batch)")
    _connection_flags(requeue, broker=True)

    database = command("db", "database schema")
    database.add_argument("action", choices=["upgrade", "revision"], help="upgrade: migrate to the newest schema")
    _connection_flags(database)

    evaluation = command("eval", "ROUGE of a batch's summaries against references, beside the Lead-3 baseline")
    evaluation.add_argument("batch", nargs="?", help="a batch whose input rows carry reference summaries")
    evaluation.add_argument("--results", help="a results file (JSONL/CSV) instead of a batch")
    evaluation.add_argument("--references", help="the corpus with references, for --results")
    evaluation.add_argument("--reference-field", default="summary", help="field with the reference (default summary)")
    evaluation.add_argument("--group-field", help="also score per value of this field (e.g. category)")
    evaluation.add_argument(
        "--language",
        default="auto",
        choices=["auto", "en", "zh", "words"],
        help="en: stemmed English words; zh: characters (CJK); words: Unicode words of any other language; "
        "auto (default): by the references' language",
    )
    evaluation.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    evaluation.add_argument("--no-lead", action="store_true", help="skip the Lead-3 baseline")
    evaluation.add_argument("--json", action="store_true", help="print JSON")
    _connection_flags(evaluation)

    api = command("api", "serve the HTTP API (OpenAI Batch API compatible) over this database and broker")
    api.add_argument("--host", default=defaults.API_HOST, help=f"address to listen on (default {defaults.API_HOST})")
    api.add_argument("--port", type=int, default=defaults.API_PORT, help=f"port (default {defaults.API_PORT})")
    api.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level of the API and uvicorn (default info)",
    )
    api.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object a line")
    _connection_flags(api, broker=True)

    keys = command(
        "keys", "API keys of the HTTP API: create (the secret is shown once), list, revoke, limits (change a key's)"
    )
    keys.add_argument("action", choices=["create", "list", "revoke", "limits"])
    keys.add_argument("key_id", nargs="?", help="the key to revoke or to change the limits of (key_...)")
    keys.add_argument("--name", help="a label for a new key")
    for flag, setting in KEY_LIMITS.values():
        keys.add_argument(
            flag,
            type=_key_limit,
            metavar="N",
            help=f"{flag.removeprefix('--').replace('-', ' ')} for this key: N, 0 (unlimited) or default "
            f"(the server's SUMFLEET_{setting.upper()}; also when not given at create)",
        )
    keys.add_argument("--json", action="store_true", help="print JSON")
    _connection_flags(keys)

    prune = command("prune", "delete batches that ended before a date, with their jobs and results")
    prune.add_argument(
        "--finished-before",
        required=True,
        metavar="DATE",
        help="ISO date or time (UTC unless it says), e.g. 2026-10-01",
    )
    _connection_flags(prune)

    tune = command("tune", "learn an adapter (soft prompt or LoRA) for a corpus with the model frozen, and score it")
    tune.add_argument("train", help="JSONL/CSV/directory with documents and reference summaries")
    tune.add_argument("--name", required=True, help="the adapter's name (each run makes a new version)")
    tune.add_argument("--model", help="base model (env SUMFLEET_MODEL; default smollm2)")
    tune.add_argument("--method", choices=["prompt-tuning", "lora"], default="prompt-tuning")
    tune.add_argument("--prompt", help="the template it is tuned (and later run) with (default one-sentence)")
    tune.add_argument("--virtual-tokens", type=int, default=20, help="soft prompt length (default 20)")
    tune.add_argument("--init-text", help="text whose embeddings start the soft prompt (default: the template's)")
    tune.add_argument("--epochs", type=int, default=1)
    tune.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    tune.add_argument("--lr", type=float, help="learning rate (default 3e-3 soft prompt, 5e-4 LoRA)")
    tune.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step (default 4)")
    tune.add_argument("--max-input-tokens", type=int, default=512, help="prompt tokens per example (default 512)")
    tune.add_argument("--lora-rank", type=int, default=8)
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints (resume point)")
    tune.add_argument("--reference-field", default="summary", help="field with the reference summary (default summary)")
    tune.add_argument("--text-field", help="field with the document (default: text, document)")
    tune.add_argument("--max-examples", type=int, help="use at most this many training rows")
    tune.add_argument("--eval", dest="heldout", help="held-out documents with references, scored after tuning")
    tune.add_argument("--eval-fraction", type=float, default=0.0, help="hold this share of TRAIN out instead")
    tune.add_argument("--eval-max-new-tokens", type=int, default=48, help="tokens per held-out summary (default 48)")
    tune.add_argument(
        "--submit", action="store_true", help="give the run to the fleet: a `sumfleet worker --tune` trains it"
    )
    _connection_flags(tune)

    adapters = command("adapters", "tuned adapters: list, show one (its settings and held-out scores), delete one")
    adapters.add_argument("action", choices=["list", "show", "delete"], nargs="?", default="list")
    adapters.add_argument("adapter", nargs="?", help="NAME or NAME@VERSION")
    adapters.add_argument("--json", action="store_true", help="print JSON")
    _connection_flags(adapters)

    prompts = command("prompts", "list the prompt templates, or show one")
    prompts.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    prompts.add_argument("name", nargs="?", help="template name for `show`")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        database_url=getattr(args, "database_url", None),
        broker_url=getattr(args, "broker_url", None),
        model=getattr(args, "model", None),
        queue=getattr(args, "queue", None),
        chunk_size=getattr(args, "chunk_size", None),
    )


def _prompt(args: argparse.Namespace) -> str | None:
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise InputError("give --prompt or --prompt-file, not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as error:
            raise InputError(f"cannot read --prompt-file {args.prompt_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise InputError(
                f"--prompt-file {args.prompt_file} is not UTF-8 "
                f"(byte 0x{error.object[error.start]:02x} at offset {error.start}); save it as UTF-8"
            ) from None
        if not text.strip():
            raise InputError(f"--prompt-file {args.prompt_file} is empty")
        return text
    return args.prompt


def _submit_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "fmt": args.input_format,
        "text_field": args.text_field,
        "id_field": args.id_field,
        "skip_bad_rows": args.skip_bad_rows,
        "prompt": _prompt(args),
        "max_new_tokens": args.max_new_tokens,
        "language": args.language,
        "max_words": args.max_words,
        "long_documents": args.long_documents,
        "trim": args.trim,
        "adapter": args.adapter,
    }


def _report_skipped(problems: Sequence[object]) -> None:
    if problems:
        print(f"skipped {len(problems)} bad row(s):", file=sys.stderr)
        for problem in problems[:50]:
            print(f"  {problem}", file=sys.stderr)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=sys.stderr)


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.client import Client

    client = Client(_settings(args))
    try:
        submission = client.submit_file(args.input, idempotency_key=args.idempotency_key, **_submit_options(args))
    except NotPublished as saved:  # committed: it runs; a caller that retried would process it twice
        _report_skipped(saved.problems)
        print(f"sumfleet submit: warning: {saved}", file=sys.stderr)
        print(saved.batch_id)
        return EXIT_SAVED_NOT_PUBLISHED
    if submission.reused:
        print(f"batch {submission.batch_id}: already submitted with this idempotency key", file=sys.stderr)
        print(submission.batch_id)
        return 0
    _report_skipped(submission.problems)
    print(
        f"batch {submission.batch_id}: {submission.accepted} documents in {submission.chunks} chunks "
        f"queued for model {client.settings.model}",
        file=sys.stderr,
    )
    if warning := client.status(submission.batch_id).warning:
        print(f"sumfleet submit: warning: {warning}", file=sys.stderr)
    print(submission.batch_id)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from producer.embedded import run_embedded
    from worker.local import run_batch_here  # the CLI is where producer and worker meet

    settings = _settings(args)
    options = _submit_options(args)
    return run_embedded(settings, args.input, args.output, run_batch_here, progress=not args.no_progress, **options)


def cmd_worker(args: argparse.Namespace) -> int:
    from models.broker import queue_for, recovery_queue_for, tune_queue_for
    from models.model_names import canonical_model, resolve_model

    settings = _settings(args)
    model = canonical_model(settings.model)
    resolve_model(model, settings)  # refuse an unknown model here, not in a crash-looping child
    if not (args.database_url or os.environ.get("SUMFLEET_DATABASE_URL")):
        # the default SQLite file is a database of this directory alone: a worker on it never sees the
        # batches that `submit` or the API wrote elsewhere, and theirs would wait forever
        raise ConfigError(
            "no database given: set SUMFLEET_DATABASE_URL (or --database-url) to the database that submit and "
            f"the API use; to serve the SQLite file of this directory on purpose, pass "
            f"--database-url {defaults.DEFAULT_DATABASE_URL}"
        )
    if args.metrics_port is not None:  # set before prometheus_client is imported: every process writes there
        import shutil
        import tempfile

        samples = os.path.join(tempfile.gettempdir(), f"sumfleet-metrics-{os.getpid()}")
        shutil.rmtree(samples, ignore_errors=True)
        os.makedirs(samples)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = samples
    from models.db import ensure_schema, open_database, wait_for_database

    database = open_database(settings.database_url)
    url = hide_password(settings.database_url)

    def waiting(reason: str, delay: float) -> None:  # PostgreSQL still starting (compose, a restart): wait for it
        print(
            f"sumfleet worker: waiting for the database at {url} ({reason}); retrying in {delay:.0f}s", file=sys.stderr
        )

    wait_for_database(database, waiting)
    ensure_schema(database, migrate=False)  # an unmigrated database is refused here, not in a crash-looping child
    database.dispose()
    from worker.app import create_worker_app

    queue = settings.queue or queue_for(model)
    app = create_worker_app(settings, model, args.concurrency, queue)
    print(
        f"sumfleet worker: model {model}, queue {queue}, broker {hide_password(settings.broker_url)}", file=sys.stderr
    )
    if args.metrics_port is not None:
        _serve_worker_metrics(settings, args.metrics_port)
    from models.logs import configure

    configure("DEBUG" if args.verbose else args.loglevel, args.log_format)  # Celery leaves the root logger to us
    app.worker_main(
        [
            "worker",
            # recovered work first (the transport tries the queues in this order), then new work
            f"--queues={recovery_queue_for(queue)},{queue}" + (f",{tune_queue_for(model)}" if args.tune else ""),
            f"--pool={args.pool}",
            f"--concurrency={args.concurrency}",
            f"--loglevel={args.loglevel}",
            f"--hostname={args.hostname or node_name(model)}",
            *(["--task-events"] if args.task_events else []),
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def node_name(model: str) -> str:
    """The Celery node name of a worker of `model`: sumfleet.<model>@<host> (%h is Celery's host)."""
    from models.broker import queue_for

    return f"{queue_for(model)}@%h"


def _serve_worker_metrics(settings: Any, port: int) -> None:
    """Prometheus /metrics of this worker (its processes' samples summed) and of the fleet's state."""
    from prometheus_client import start_http_server

    from models.db import open_database, session_factory
    from models.metrics import FleetCollector, QueueLength, worker_registry

    registry = worker_registry()
    registry.register(
        FleetCollector(session_factory(open_database(settings.database_url)), QueueLength(settings.broker_url))
    )
    start_http_server(port, registry=registry)
    print(f"sumfleet worker: metrics at http://0.0.0.0:{port}/metrics", file=sys.stderr)


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _status_text(status: Any) -> str:
    states = ("queued", "running", "succeeded", "failed", "cancelled")
    counts = ", ".join(f"{state} {status.counts.get(state, 0)}" for state in states)
    rate = status.docs_per_second
    return (
        f"batch {status.id}  {status.state}  model {status.model}  prompt {status.prompt}\n"
        f"  {status.finished}/{status.total} done: {counts}\n"
        f"  {f'{rate:.2f}' if rate else '-'} docs/s  elapsed {_format_seconds(status.elapsed)}"
        f"  ETA {_format_seconds(status.eta_seconds)}" + (f"\n  warning: {status.warning}" if status.warning else "")
    )


def _reader(args: argparse.Namespace) -> Client:
    """A client for reading commands: they create the schema only on a SQLite file (embedded use)."""
    from producer.client import Client

    settings = _settings(args)
    return Client(settings, migrate=settings.database_url.startswith("sqlite"))


def cmd_status(args: argparse.Namespace) -> int:
    client = _reader(args)
    if args.batch.startswith("tune_"):  # a tuning run given to the fleet
        run = client.tuning_status(args.batch)
        while args.watch and run["state"] in ("queued", "running"):
            time.sleep(args.interval)
            run = client.tuning_status(args.batch)
        print(json.dumps(run) if args.json else _tuning_text(run))
        return 0 if run["state"] != "failed" else 3
    status = client.status(args.batch)
    timed_out = False
    if args.watch:
        from tqdm import tqdm

        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        with tqdm(total=status.total, initial=status.finished, unit="doc", file=sys.stderr) as bar:
            bar.set_postfix(failed=status.counts.get("failed", 0), refresh=False)
            while not status.done or status.counts.get("running"):  # a cancelled batch: until its running jobs stop
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(
                    args.interval if deadline is None else max(0.0, min(args.interval, deadline - time.monotonic()))
                )
                status = client.status(args.batch)
                bar.set_postfix(failed=status.counts.get("failed", 0), refresh=False)
                bar.update(status.finished - bar.n)
    print(json.dumps(status.as_dict()) if args.json else _status_text(status))
    if args.verify or args.repair:
        wrong = client.verify(args.batch, repair=args.repair)
        for line in wrong:
            print(f"counter disagrees with the jobs: {line}", file=sys.stderr)
        if wrong and not args.repair:
            raise SumfleetError(f"batch {args.batch}: {len(wrong)} counter(s) disagree with a recount (--repair fixes)")
        print(
            f"batch {args.batch}: counters {'repaired' if wrong else 'agree with a recount of the jobs'}",
            file=sys.stderr,
        )
    if timed_out:
        print(f"sumfleet status: batch {args.batch} still {status.state} after {args.timeout:g}s", file=sys.stderr)
        return EXIT_WATCH_TIMEOUT
    if args.watch:  # like `run`: 0 all succeeded, 3 some failed or cancelled
        return 0 if status.counts.get("succeeded", 0) == status.total else 3
    return 0


def _tuning_text(run: dict[str, Any]) -> str:
    steps = f"step {run['step']}/{run['total_steps'] or '?'}" + (f", loss {run['loss']:.3f}" if run["loss"] else "")
    made = f"  adapter {run['adapter']} (sumfleet adapters show {run['adapter']})" if run["adapter"] else ""
    failed = f"  failed: {run['error']}" if run["error"] else ""
    what = f"{run['name']} ({run['method']}) on {run['model']}"
    return f"tuning run {run['id']}  {run['state']}  {what}  {steps}{made}{failed}"


def cmd_workers(args: argparse.Namespace) -> int:
    client = _reader(args)
    listed = [w for w in client.workers() if w["state"] == "live" or not args.live]
    if args.json:
        for worker in listed:
            print(json.dumps(worker))
        return 0
    print(f"{'worker':<28} {'state':<8} {'model':<20} {'device':<8} {'dtype':<9} {'docs':>8} {'beat':>6}  batch")
    for w in listed:
        beat = f"{w['heartbeat_age']:.0f}s"
        print(
            f"{w['id']:<28} {w['state']:<8} {w['model']:<20} {w['device'] or '-':<8} {w['dtype'] or '-':<9} "
            f"{w['documents']:>8} {beat:>6}  {w['current_batch'] or '-'}"
        )
    live = sum(w["state"] == "live" for w in listed)
    print(f"{live} live worker process(es)", file=sys.stderr)
    return 0


def cmd_batches(args: argparse.Namespace) -> int:
    client = _reader(args)
    listed = client.batches(args.limit, args.before)
    if args.json:
        for status in listed:
            print(json.dumps(status.as_dict()))
        return 0
    print(f"{'batch':<18} {'state':<10} {'done':>13} {'failed':>7}  {'model':<20} created")
    for s in listed:
        print(
            f"{s.id:<18} {s.state:<10} {f'{s.finished}/{s.total}':>13} {s.counts.get('failed', 0):>7}  "
            f"{s.model[:20]:<20} {s.created_at:%Y-%m-%d %H:%M:%S}"
        )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from producer.export import check_output, write_results

    check_output(args.output, args.output_format)
    client = _reader(args)
    client.status(args.batch)  # unknown batch: fail before creating the output file
    written = write_results(client.results(args.batch), args.output, args.output_format)
    print(f"wrote {written} results to {args.output}", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    cancelled, running = _reader(args).cancel(args.batch)
    print(
        f"batch {args.batch}: cancelled {cancelled} job(s) not running; {running} running stop after their "
        "current generation batch (finished results are kept)",
        file=sys.stderr,
    )
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    from models.errors import InvalidTransition
    from models.store import unfinished_batches

    client = _reader(args)
    if args.batch:
        client.status(args.batch)  # an unknown id is an error; so is an ended one (publish refuses it)
        batches = [args.batch]
    else:
        with client.sessions() as session:
            batches = [batch_id for batch_id, _, _ in unfinished_batches(session)]
    for batch_id in batches:
        try:
            chunks = client.publish(batch_id)
        except InvalidTransition as ended:
            if args.batch:
                raise
            print(f"batch {batch_id}: skipped: {ended}", file=sys.stderr)  # it ended since it was listed
            continue
        print(f"batch {batch_id}: published {chunks} chunk(s)", file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from producer.tuning_data import describe_scores, examples_from, split_heldout, tqdm_bar
    from worker.tuning import TuneConfig

    settings = _settings(args)
    limit = settings.max_document_chars
    pairs = examples_from(args.train, args.reference_field, args.text_field, limit, args.max_examples)
    held = examples_from(args.heldout, args.reference_field, args.text_field, limit) if args.heldout else []
    if args.eval_fraction and not held:
        pairs, held = split_heldout(pairs, args.eval_fraction, args.seed)
    config = TuneConfig(
        method=args.method,
        virtual_tokens=args.virtual_tokens,
        init_text=args.init_text,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_input_tokens=args.max_input_tokens,
        lora_rank=args.lora_rank,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    from producer.client import Client

    client = Client(settings)
    if args.submit:
        run_id = client.submit_tuning(
            args.name, pairs, held, asdict(config), prompt=args.prompt, max_new_tokens=args.eval_max_new_tokens
        )
        print(
            f"tuning run {run_id} queued for a `sumfleet worker --tune` (follow it: sumfleet status {run_id})",
            file=sys.stderr,
        )
        print(run_id)
        return 0
    from worker import tuning  # the CLI is where producer and worker meet

    client.ensure_schema()
    with tqdm_bar() as progress:
        outcome = tuning.run(
            client.sessions,
            settings,
            args.name,
            [tuning.Example(document, reference) for document, reference in pairs],
            [tuning.Example(document, reference) for document, reference in held],
            config,
            args.prompt,
            args.eval_max_new_tokens,
            progress=progress,
        )
    print(outcome.describe(describe_scores))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    import shutil

    from models.adapters import adapter_dir, delete_adapter, find_adapter, list_adapters

    client = _reader(args)
    client.ensure_schema()
    if args.action == "list":
        with client.sessions() as session:
            found = list_adapters(session)
        for a in found:
            row = {
                "adapter": f"{a.name}@{a.version}",
                "model": a.base_model,
                "method": a.method,
                "examples": a.train_examples,
                "created_at": a.created_at.isoformat(),
            }
            line = f"{row['adapter']:<30} {a.method:<14} {a.base_model[:24]:<24} {a.train_examples:>7}"
            print(json.dumps(row) if args.json else f"{line} {a.created_at:%Y-%m-%d %H:%M}")
        return 0
    if not args.adapter:
        raise InputError(f"`sumfleet adapters {args.action}` needs an adapter name (NAME or NAME@VERSION)")
    if args.action == "show":
        with client.sessions() as session:
            a = find_adapter(session, args.adapter)
        shown = {
            "adapter": f"{a.name}@{a.version}",
            "model": a.base_model,
            "method": a.method,
            "params": a.params,
            "data_fingerprint": a.data_fingerprint,
            "train_examples": a.train_examples,
            "scores": a.scores,
            "path": str(adapter_dir(client.settings.adapter_dir) / a.path),
            "created_at": a.created_at.isoformat(),
        }
        print(json.dumps(shown, indent=None if args.json else 2))
        return 0
    with client.sessions.begin() as session:
        gone = delete_adapter(session, args.adapter)
    shutil.rmtree(adapter_dir(client.settings.adapter_dir) / gone.path, ignore_errors=True)
    print(f"deleted adapter {gone.name}@{gone.version}", file=sys.stderr)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(args.finished_before)
    except ValueError:
        raise InputError(f"--finished-before: {args.finished_before!r} is not an ISO date or time") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    batches, jobs = _reader(args).prune(moment)
    print(f"pruned {batches} batch(es) that ended before {moment.isoformat()}, {jobs} job(s)", file=sys.stderr)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from models.db import current_revision, open_database, upgrade

    engine = open_database(_settings(args).database_url)
    if args.action == "upgrade":
        print(f"database at revision {upgrade(engine)}", file=sys.stderr)
    else:
        print(current_revision(engine) or "none")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from producer.evaluate import evaluate, pairs_from_files, pairs_from_rows

    if args.results or args.references:
        if args.batch or not (args.results and args.references):
            raise InputError("give a batch id, or --results and --references (not both)")
        pairs = pairs_from_files(
            args.results, args.references, reference_field=args.reference_field, group_field=args.group_field
        )
    elif args.batch:
        client = _reader(args)
        status = client.status(args.batch)
        if not status.done:
            raise InputError(f"batch {args.batch} is still {status.state}; evaluate it once it has ended")
        rows, references = [], {}
        for row, reference in client.references(args.batch, args.reference_field, args.group_field):
            rows.append(row)
            references[row["id"]] = reference
        pairs = pairs_from_rows(rows, references)
    else:
        raise InputError("give a batch id, or --results and --references")
    report = evaluate(
        pairs,
        group_field=args.group_field,
        with_lead=not args.no_lead,
        language=args.language,
        bootstrap=args.bootstrap,
    )
    print(json.dumps(report.as_dict(), ensure_ascii=False) if args.json else report.table())
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from models.prompts import TEMPLATES, resolve_prompt

    if args.action == "show":
        if not args.name:
            raise InputError("`sumfleet prompts show` needs a template name")
        for language, template in resolve_prompt(args.name).variants.items():
            print(f"[{language}]\n{template}\n")
        return 0
    for name, variants in TEMPLATES.items():
        first = variants["en"].replace("\n", " ")
        print(f"{name:<14} {'/'.join(variants):<7} {first[:64]}")
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from models.logs import configure
    from producer.api.app import prepared, serve

    configure("DEBUG" if args.verbose else args.log_level, args.log_format)
    app = prepared(_settings(args))
    print(f"sumfleet api: http://{args.host}:{args.port} (OpenAPI at /openapi.json, docs at /docs)", file=sys.stderr)
    serve(app, args.host, args.port, args.log_level, args.log_format)
    return 0


# a key's limits: the ApiKey column -> (its `sumfleet keys` flag, the server's setting it overrides)
KEY_LIMITS = {
    "rate_limit_per_minute": ("--requests-per-minute", "api_rate_limit_per_minute"),
    "documents_per_day": ("--documents-per-day", "api_documents_per_day"),
    "batches_in_flight": ("--batches-in-flight", "api_batches_in_flight"),
}
SERVER_DEFAULT = "default"  # a limit given as `default` follows the server's setting


def _key_limit(text: str) -> int | str:
    if text.strip().lower() == SERVER_DEFAULT:
        return SERVER_DEFAULT
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (0: unlimited) or default, got {text!r}")
    return value


def _limits_shown(key: Any) -> str:
    shown = []
    for column, (flag, _) in KEY_LIMITS.items():
        value = getattr(key, column)
        shown.append(f"{flag.removeprefix('--')}={'default' if value is None else value or 'unlimited'}")
    return " ".join(shown)


def cmd_keys(args: argparse.Namespace) -> int:
    from models.api_store import UNCHANGED, create_key, list_keys, revoke_key, set_key_limits
    from producer.client import Client

    given = {
        column: getattr(args, flag.removeprefix("--").replace("-", "_")) for column, (flag, _) in KEY_LIMITS.items()
    }
    if args.action not in ("create", "limits") and any(value is not None for value in given.values()):
        raise InputError(
            f"limits are set by `sumfleet keys create` or `sumfleet keys limits`, not `keys {args.action}`"
        )
    client = Client(_settings(args))  # creates the schema on a fresh database, like submit
    client.ensure_schema()
    if args.action == "create":
        limits = {column: None if value in (None, SERVER_DEFAULT) else value for column, value in given.items()}
        with client.sessions.begin() as session:
            new = create_key(session, args.name, **limits)
        if args.json:
            print(
                json.dumps(
                    {
                        "id": new.id,
                        "name": new.name,
                        "api_key": new.secret,
                        "webhook_secret": new.webhook_secret,
                        **limits,
                    }
                )
            )
        else:
            print(f"key id:         {new.id}\napi key:        {new.secret}\nwebhook secret: {new.webhook_secret}")
            print(f"limits:         {_limits_shown(new)}")
            print("the api key and webhook secret are shown only now; store them safely", file=sys.stderr)
        return 0
    if args.action == "limits":
        if not args.key_id:
            raise InputError("`sumfleet keys limits` needs a key id (see `sumfleet keys list`)")
        changes = {
            column: UNCHANGED if value is None else None if value == SERVER_DEFAULT else value
            for column, value in given.items()
        }
        with client.sessions.begin() as session:
            changed = set_key_limits(session, args.key_id, **changes)
            shown = None if changed is None else _limits_shown(changed)
        if shown is None:
            raise InputError(f"no API key {args.key_id!r} (see `sumfleet keys list`)")
        print(f"{args.key_id}: {shown}")
        return 0
    if args.action == "revoke":
        if not args.key_id:
            raise InputError("`sumfleet keys revoke` needs a key id (see `sumfleet keys list`)")
        with client.sessions.begin() as session:
            revoked = revoke_key(session, args.key_id)
        if revoked is None:
            raise InputError(f"no API key {args.key_id!r} (see `sumfleet keys list`)")
        print(f"revoked {args.key_id}", file=sys.stderr)
        return 0
    with client.sessions() as session:
        listed = list_keys(session)
    for key in listed:
        row = {
            "id": key.id,
            "name": key.name,
            "prefix": key.secret_prefix,
            "created_at": key.created_at.isoformat(),
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            **{column: getattr(key, column) for column in KEY_LIMITS},
        }
        if args.json:
            print(json.dumps(row))
        else:
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            print(f"{key.id:<22} {key.secret_prefix + '...':<20} {state:<24} {key.name or '':<16} {_limits_shown(key)}")
    return 0


COMMANDS = {
    "api": cmd_api,
    "keys": cmd_keys,
    "run": cmd_run,
    "submit": cmd_submit,
    "worker": cmd_worker,
    "status": cmd_status,
    "batches": cmd_batches,
    "workers": cmd_workers,
    "results": cmd_results,
    "cancel": cmd_cancel,
    "requeue": cmd_requeue,
    "db": cmd_db,
    "prune": cmd_prune,
    "tune": cmd_tune,
    "adapters": cmd_adapters,
    "eval": cmd_eval,
    "prompts": cmd_prompts,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except SumfleetError as error:
        print(f"sumfleet {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sumfleet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
