"""The bookkeeping at scale: enqueue, coordination, status and export, with a do-nothing engine.

    python bench/scale.py                      # enqueue 10k/100k/1M, status and export at 1M, 1/2/4 workers on 100k
    python bench/scale.py --sizes 10000,100000 --workers 1,2 --coordination-docs 20000

Every document is summarized by `python:bench.nullengine:factory`, which answers at once, so
the figures are those of the queue, the database and sumfleet's own code. Each measurement
runs real `sumfleet` processes against PostgreSQL (a database of its own) and Redis (db 14)
and prints docs/s, CPU-seconds per 1,000 documents of the sumfleet processes and of
PostgreSQL, and peak RSS, with the machine's CPU flags and load average beside them.
The export of the 1M batch first marks its jobs succeeded with a summary in SQL (no worker
runs a million documents here); the coordination runs push real batches through workers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from models.settings import Settings  # noqa: E402
from producer.client import Client  # noqa: E402

PG_ADMIN = os.environ.get("SUMFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("SUMFLEET_TEST_REDIS", "redis://127.0.0.1:6379")
MODEL = "python:bench.nullengine:factory"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")))
    return []


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(predicate: Any) -> float:
    """CPU seconds (user + system) of the live processes whose (comm, pgid) satisfy `predicate`, with
    those of their children that have exited (PostgreSQL's postmaster reaps every finished backend)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        fields = _stat(int(entry.name))
        if fields and predicate(comm, int(fields[2])):
            total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return total / TICK


def postgres_cpu() -> float:
    return cpu_seconds(lambda comm, pgid: comm.startswith("postgres"))


@dataclass
class Run:
    """A finished child process: wall seconds, CPU seconds and peak RSS (MiB)."""

    seconds: float
    cpu: float
    rss_mib: float
    stdout: str


# runs `sumfleet ARGS`, then writes the process's own peak RSS (VmHWM: unlike ru_maxrss, not
# inherited from the parent's image before exec) to the file PEAK_RSS_FILE names
_MEASURED = """
import os, sys
from pathlib import Path
from producer.cli import main
code = main(sys.argv[1:])
peak = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
Path(os.environ["PEAK_RSS_FILE"]).write_text(peak.split()[1])
sys.exit(code)
"""


def run_measured(args: list[str], env: dict[str, str]) -> Run:
    """Run `sumfleet ARGS`; its CPU time from wait4, its peak RSS from its own VmHWM."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as peak:
        command = [sys.executable, "-c", _MEASURED, *args]
        process = subprocess.Popen(command, env={**env, "PEAK_RSS_FILE": peak.name}, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        rss_kib = int(Path(peak.name).read_text() or 0)
    if process.returncode != 0:
        raise SystemExit(f"sumfleet {' '.join(args)} failed ({process.returncode}):\n{stderr}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, rss_kib / 1024, stdout)


@contextmanager
def database() -> Any:
    name = f"sumfleet_scale_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def environment(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMFLEET_")}
    env.update({f"SUMFLEET_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None})
    return env


def corpus(directory: Path, count: int) -> Path:
    path = directory / f"corpus-{count}.jsonl"
    with path.open("w") as handle:
        for i in range(count):
            handle.write(json.dumps({"id": f"doc-{i}", "text": f"Document {i} opens with a sentence. A second."}))
            handle.write("\n")
    return path


def sumfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "producer.cli", *args]


def enqueue(settings: Settings, path: Path, count: int) -> tuple[dict[str, Any], str]:
    """`sumfleet submit` of `count` documents: wall, docs/s, CPU per 1,000 docs (submit, PostgreSQL), peak RSS."""
    before = postgres_cpu()
    run = run_measured(["submit", str(path), "--model", MODEL], environment(settings))
    database_cpu = postgres_cpu() - before
    figures = {
        "docs": count,
        "seconds": round(run.seconds, 2),
        "docs_per_s": round(count / run.seconds),
        "submit_cpu_s_per_1000": round(run.cpu / count * 1000, 4),
        "postgres_cpu_s_per_1000": round(database_cpu / count * 1000, 4),
        "submit_peak_rss_mib": round(run.rss_mib, 1),
        "load_average": load(),
    }
    return figures, run.stdout.strip()


def status_latency(settings: Settings, batch_id: str, repeat: int = 50) -> dict[str, Any]:
    client = Client(settings, migrate=False)
    client.status(batch_id)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        client.status(batch_id)
        times.append((time.perf_counter() - started) * 1000)
    client.close()
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(repeat * 0.95) - 1], 2)}


def finish_in_sql(settings: Settings, batch_id: str) -> None:
    """Mark every job of the batch succeeded with a summary (the export then has real rows to write)."""
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "UPDATE jobs SET state = 'succeeded', summary = left(text, 40), prompt_tokens = 12, output_tokens = 8, "
            "finished_at = now() WHERE batch_id = %s",
            (batch_id,),
        )
    client = Client(settings, migrate=False)
    client.verify(batch_id, repair=True)
    client.close()


def export(settings: Settings, batch_id: str, count: int, directory: Path) -> dict[str, Any]:
    path = directory / f"results-{count}.jsonl"
    run = run_measured(["results", batch_id, "-o", str(path)], environment(settings))
    rows = sum(1 for _ in path.open())
    path.unlink()
    return {
        "rows": rows,
        "seconds": round(run.seconds, 2),
        "rows_per_s": round(rows / run.seconds),
        "peak_rss_mib": round(run.rss_mib, 1),
        "load_average": load(),
    }


def coordination(settings: Settings, path: Path, count: int, workers: int) -> dict[str, Any]:
    """`workers` real worker processes (prefork, one child each) drain a batch of `count` documents."""
    env = environment(settings)
    logs = [tempfile.NamedTemporaryFile(suffix=".log", delete=False) for _ in range(workers)]  # noqa: SIM115
    processes = [
        subprocess.Popen(
            sumfleet("worker", "--model", MODEL, "--loglevel", "WARNING"),
            env={**env, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for log in logs
    ]
    try:
        time.sleep(3)  # prefork children start and connect
        for process in processes:
            if process.poll() is not None:
                raise SystemExit(f"a worker exited: {Path(logs[0].name).read_text()}")
        groups = {process.pid for process in processes}
        workers_before = cpu_seconds(lambda comm, pgid: pgid in groups)
        database_before = postgres_cpu()
        client = Client(settings, migrate=False)
        started = time.perf_counter()
        submission = client.submit_file(str(path), model=MODEL)
        submitted = time.perf_counter() - started
        while not (status := client.status(submission.batch_id)).done:
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        worker_cpu = cpu_seconds(lambda comm, pgid: pgid in groups) - workers_before
        database_cpu = postgres_cpu() - database_before
        wrong = client.verify(submission.batch_id)
        client.close()
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(60)
        for log in logs:
            os.unlink(log.name)
    return {
        "workers": workers,
        "docs": count,
        "succeeded": status.counts.get("succeeded", 0),
        "seconds": round(seconds, 2),
        "submit_seconds": round(submitted, 2),
        "docs_per_s": round(count / seconds),
        "worker_cpu_s_per_1000": round(worker_cpu / count * 1000, 4),
        "postgres_cpu_s_per_1000": round(database_cpu / count * 1000, 4),
        "counters_agree": not wrong,
        "load_average": load(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="enqueue sizes (the largest is exported)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the coordination runs")
    parser.add_argument("--coordination-docs", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{os.cpu_count()} CPUs, flags {' '.join(cpu_flags())}; load average {load()}", file=sys.stderr)
    record: dict[str, Any] = {"cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "enqueue": [], "coordination": []}
    broker = f"{REDIS}/14"
    with tempfile.TemporaryDirectory() as scratch, database() as url:
        directory = Path(scratch)
        settings = Settings(database_url=url, broker_url=broker, queue=f"sumfleet.scale-{secrets.token_hex(3)}")
        Client(settings).ensure_schema()
        largest = ("", 0)
        for count in sizes:
            path = corpus(directory, count)
            figures, batch_id = enqueue(settings, path, count)
            print(f"enqueue {count:>9,}: {json.dumps(figures)}", file=sys.stderr)
            record["enqueue"].append(figures)
            redis.Redis.from_url(broker).delete(str(settings.queue))  # nobody runs these
            path.unlink()
            if count >= largest[1]:
                largest = (batch_id, count)
        batch_id, count = largest
        record["status"] = {"docs": count, **status_latency(settings, batch_id)}
        print(f"status on {count:,}: {json.dumps(record['status'])}", file=sys.stderr)
        finish_in_sql(settings, batch_id)
        record["export"] = export(settings, batch_id, count, directory)
        print(f"export {count:,}: {json.dumps(record['export'])}", file=sys.stderr)
        path = corpus(directory, args.coordination_docs)
        for workers in (int(w) for w in args.workers.split(",")):
            run_settings = settings.model_copy(update={"queue": f"sumfleet.scale-{secrets.token_hex(3)}"})
            figures = coordination(run_settings, path, args.coordination_docs, workers)
            print(f"coordination: {json.dumps(figures)}", file=sys.stderr)
            record["coordination"].append(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
