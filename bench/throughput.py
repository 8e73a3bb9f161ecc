"""Engine throughput benchmark: the plain transformers pipeline vs the sumfleet engine, and the
whole system (submit + a real worker over Redis and PostgreSQL) vs the engine alone.

    python bench/throughput.py                       # 24 docs of ../shared/corpora/bbc_news.jsonl
    python bench/throughput.py --docs 48 --corpus my.jsonl --skip-system
    python bench/throughput.py --soak 1000           # worker memory across 1,000 short documents

Everything is measured in one run on the same documents, model, prompt, greedy decoding and
output length limit, and printed as figures and ratios; a JSON record goes to --out.
Needs Redis and PostgreSQL for the system part (SUMFLEET_TEST_PG / SUMFLEET_TEST_REDIS, as
in the tests). Wall-clock figures on a shared machine are noisy: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import pipeline  # noqa: E402

from models.claims import ClaimedJob  # noqa: E402
from models.prompts import TEMPLATES, PromptPlan  # noqa: E402
from models.settings import Settings  # noqa: E402
from producer.client import Client  # noqa: E402
from worker.engine import GenerationParams  # noqa: E402
from worker.loading import load_engine  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "bbc_news.jsonl"
PG_ADMIN = os.environ.get("SUMFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("SUMFLEET_TEST_REDIS", "redis://127.0.0.1:6379")


def read_docs(path: Path, count: int, max_chars: int | None = None) -> list[dict]:
    docs: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            text = row.get("text") or row.get("document")
            docs.append({"id": str(row.get("id", len(docs))), "text": text[:max_chars] if max_chars else text})
            if len(docs) == count:
                break
    return docs


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix flags (what decides bf16 vs fp32), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")))
    except OSError:
        pass
    return []


def timed(label: str, work: Any) -> tuple[float, Any]:
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    started = time.perf_counter()
    result = work()
    elapsed = time.perf_counter() - started
    print(f" {elapsed:.1f}s", file=sys.stderr)
    return elapsed, result


def figures(n_docs: int, seconds: float, tokens: int) -> dict:
    return {
        "seconds": round(seconds, 2),
        "docs_per_s": round(n_docs / seconds, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }


def bench_pipelines(engine: Any, docs: list[dict], template: PromptPlan, max_new: int) -> dict:
    tokenizer = engine.backend.tokenizer.hf
    tokenizer.padding_side = "left"
    pipe = pipeline("text-generation", model=engine.backend.model, tokenizer=tokenizer)
    chats = [[{"role": "user", "content": template.render(template.variants["en"], d["text"], "en")}] for d in docs]
    kwargs = {"max_new_tokens": max_new, "do_sample": False, "return_full_text": False}

    def count(outputs) -> int:
        return sum(len(tokenizer(o[0]["generated_text"], add_special_tokens=False)["input_ids"]) for o in outputs)

    out: dict = {}
    seconds, outputs = timed("pipeline, one document at a time", lambda: [pipe(c, **kwargs) for c in chats])
    out["pipeline_one_at_a_time"] = figures(len(docs), seconds, count(outputs))
    seconds, outputs = timed("pipeline, batch_size=8", lambda: pipe(chats, batch_size=8, **kwargs))
    out["pipeline_batch_8"] = figures(len(docs), seconds, count(outputs))
    return out


def bench_engine(engine: Any, docs: list[dict], template: PromptPlan, max_new: int, label: str) -> tuple[dict, list]:
    jobs = [ClaimedJob(i, d["id"], d["text"], 1) for i, d in enumerate(docs)]
    params = GenerationParams(max_new_tokens=max_new)
    seconds, batches = timed(label, lambda: list(engine.run(jobs, template, params)))
    outcomes = [o for batch in batches for o in batch]
    tokens = sum(o.output_tokens or 0 for o in outcomes)
    result = figures(len(docs), seconds, tokens)
    result["failed"] = sum(1 for o in outcomes if o.error)
    result["generation_batches"] = len(batches)
    return result, outcomes


# -- the whole system ------------------------------------------------------------------------


def _pg_database() -> tuple[str, str]:
    import psycopg

    name = f"sumfleet_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def _drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def bench_system(
    docs: list[dict], model: str, prompt: str, max_new: int, chunk_size: int, sample_memory: bool = False
) -> dict:
    """`Client.submit` + one real `sumfleet worker` over Redis and PostgreSQL, model loaded first."""
    name, url = _pg_database()
    settings = Settings(
        database_url=url,
        broker_url=f"{REDIS}/14",
        queue=f"sumfleet.bench-{secrets.token_hex(3)}",
        chunk_size=chunk_size,
        max_new_tokens=max_new,
        prompt=prompt,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMFLEET_")}
    env.update({f"SUMFLEET_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None})
    client = Client(settings)
    client.ensure_schema()
    log = open(ROOT / "bench" / "results" / "worker.log", "wb")  # noqa: SIM115 - the worker writes it until the end
    worker = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "worker", "--model", model, "--loglevel", "INFO"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    samples: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 600
        while "ready with model" not in (ROOT / "bench" / "results" / "worker.log").read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the worker did not start: see bench/results/worker.log")
            time.sleep(0.5)
        child = _children(worker.pid)[0]
        print("  system: submit + 1 worker over Redis and PostgreSQL ...", end="", flush=True, file=sys.stderr)
        started = time.perf_counter()
        submission = client.submit(docs, model=model)
        while True:
            status = client.status(submission.batch_id)
            if sample_memory:
                samples.append((status.finished, _rss_kib(child)))
            if status.done:
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - started
        print(f" {elapsed:.1f}s", file=sys.stderr)
        rows = list(client.results(submission.batch_id))
        result = figures(len(docs), elapsed, sum(r["output_tokens"] or 0 for r in rows))
        result["failed"] = sum(1 for r in rows if r["status"] != "succeeded")
        result["worker_peak_rss_mib"] = round(_rss_kib(child, "VmHWM") / 1024, 1)
        result["worker_rss_mib"] = round(_rss_kib(child) / 1024, 1)
        if samples:
            result["rss_samples_mib"] = [
                (done, round(kib / 1024, 1)) for done, kib in samples[:: max(1, len(samples) // 40)]
            ]
        return result
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        client.close()
        _drop_database(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS if DEFAULT_CORPUS.exists() else ROOT / "examples" / "sample.jsonl"
    )
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="one-sentence")
    parser.add_argument("--skip-pipelines", action="store_true")
    parser.add_argument("--skip-system", action="store_true")
    parser.add_argument("--variants", action="store_true", help="also time dtype / scheduler variants")
    parser.add_argument("--soak", type=int, default=0, help="worker memory over this many short documents")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = parser.parse_args()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)

    if args.soak:
        docs = read_docs(args.corpus, args.soak, max_chars=600)
        print(f"soak: {len(docs)} documents (first 600 characters), 16 new tokens", file=sys.stderr)
        soak: dict[str, Any] = {"soak": bench_system(docs, args.model, args.prompt, 16, 32, sample_memory=True)}
        samples = soak["soak"]["rss_samples_mib"]
        quarter = len(docs) // 4
        early = [rss for done, rss in samples if quarter <= done < 2 * quarter]
        late = [rss for done, rss in samples if done >= 3 * quarter]
        if early and late:  # growth = mean RSS of the last quarter minus that of the second quarter
            soak["soak"]["rss_growth_after_warmup_mib"] = round(sum(late) / len(late) - sum(early) / len(early), 1)
        print(json.dumps({k: v for k, v in soak["soak"].items() if k != "rss_samples_mib"}, indent=2))
        args.out.with_name("soak.json").write_text(json.dumps(soak, indent=2))
        return 0

    docs = read_docs(args.corpus, args.docs)
    template = PromptPlan(TEMPLATES[args.prompt])
    settings = Settings(database_url="sqlite://")
    print(
        f"{len(docs)} documents from {args.corpus}, {args.max_new_tokens} new tokens, greedy; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; flags {' '.join(cpu_flags())}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        file=sys.stderr,
    )
    _, engine = timed("loading the engine", lambda: load_engine(args.model, settings))
    defaults_batch = engine.max_batch_size
    record: dict[str, Any] = {
        "corpus": str(args.corpus),
        "docs": len(docs),
        "max_new_tokens": args.max_new_tokens,
        "model": args.model,
        "dtype": str(engine.backend.model.dtype),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
        },
    }
    if not args.skip_pipelines:
        # the baseline is the plain pipeline as transformers gives it: float32 unless told otherwise
        if engine.backend.model.dtype == torch.float32:
            record.update(bench_pipelines(engine, docs, template, args.max_new_tokens))
        else:
            plain = load_engine(args.model, settings.model_copy(update={"dtype": "float32"}))
            record.update(bench_pipelines(plain, docs, template, args.max_new_tokens))
            del plain
        record["pipeline_dtype"] = "torch.float32"
    record["engine"], _ = bench_engine(engine, docs, template, args.max_new_tokens, "sumfleet engine (defaults)")
    if args.variants:
        engine.backend.packs_itself = True  # continuous batching: transformers' generate_batch
        record["engine_continuous"], _ = bench_engine(
            engine, docs, template, args.max_new_tokens, "engine, continuous batching"
        )
        engine.backend.packs_itself = False
        for size in sorted({4, 8, 16, 32} - {engine.max_batch_size}):
            engine.max_batch_size = size
            record[f"engine_batch_{size}"], _ = bench_engine(
                engine, docs, template, args.max_new_tokens, f"engine, batches of {size}"
            )
        engine.max_batch_size = settings.max_batch_size or defaults_batch
    del engine
    if not args.skip_system:
        record["system"] = bench_system(docs, args.model, args.prompt, args.max_new_tokens, 32)

    ratios = {}
    eng = record["engine"]["docs_per_s"]
    for key in ("pipeline_one_at_a_time", "pipeline_batch_8"):
        if key in record:
            ratios[f"engine_vs_{key}"] = round(eng / record[key]["docs_per_s"], 2)
    if "system" in record:
        ratios["system_vs_engine"] = round(record["system"]["docs_per_s"] / eng, 3)
    record["ratios"] = ratios
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
