"""The bookkeeping at scale, on the real PostgreSQL: no hot query scans the jobs table of a
million rows, and submitting holds a bounded number of documents in memory."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text, update

from models.claims import JobOutcome, claim_jobs, finish_jobs, give_up_exhausted, release_jobs
from models.counters import counts_of, recount, repair
from models.db import ensure_schema, open_database, session_factory
from models.job_writer import JobWriter
from models.states import JobState
from models.store import (
    batch_counts,
    close_batch_if_done,
    count_expired,
    create_batch,
    get_batch,
    iter_claimable_chunks,
    iter_job_id_chunks,
    iter_results,
    list_batches,
    utcnow,
)
from models.tables import Job
from tests.conftest import PG_ADMIN, ROOT, _pg_admin

pytestmark = pytest.mark.services
ROWS = 1_000_000
ON_JOBS = re.compile(r"\bjobs\b")  # the table, not the batches.jobs_* counters


@pytest.fixture(scope="module")
def million() -> Iterator[tuple[Engine, str]]:
    """A database of its own holding a batch of a million jobs (and a small one beside it)."""
    name = f"sumfleet_scale_{secrets.token_hex(4)}"
    with _pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    database = open_database(f"{base}/{name}")
    ensure_schema(database, migrate=True)
    sessions = session_factory(database)
    with sessions.begin() as session:
        ids = [
            create_batch(
                session, model="lead", queue="q", prompt_name="p", prompt_template="{document}", params={}, source=None
            ).id
            for _ in range(2)
        ]
    with database.begin() as connection:
        for batch_id, count in ((ids[0], ROWS), (ids[1], 1000)):
            connection.execute(
                text(
                    "INSERT INTO jobs (batch_id, doc_id, line, text, state, attempts, created_at) "
                    "SELECT :batch, 'doc-' || n, n, 'Document ' || n || ' says one thing. Then another.', "
                    "'queued', 0, now() FROM generate_series(1, :count) AS n"
                ),
                {"batch": batch_id, "count": count},
            )
        connection.execute(text("ANALYZE jobs"))
    with sessions.begin() as session:
        for batch_id in ids:
            repair(session, batch_id, recount(session, batch_id))
    yield database, ids[0]
    database.dispose()
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_no_hot_query_scans_the_jobs_table(million: tuple[Engine, str]) -> None:
    """Run every hot path once on the million-job batch, then EXPLAIN each statement it sent."""
    database, batch_id = million
    sessions = session_factory(database)
    sent: list[tuple[str, Any]] = []

    def capture(connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if not many and statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            sent.append((statement, parameters))

    event.listen(database, "before_cursor_execute", capture)
    try:
        chunks = iter_job_id_chunks(sessions, batch_id, 256, [JobState.QUEUED])
        next(chunks)
        chunk = next(chunks)  # a page past the first
        with sessions.begin() as session:
            claimed = claim_jobs(session, chunk, "w1")
            session.execute(update(Job).where(Job.id == chunk[0]).values(lease_expires_at=utcnow() - timedelta(1)))
            give_up_exhausted(session, chunk[:1], max_attempts=5)
            release_jobs(session, chunk[-1:], "w1")
            finish_jobs(session, [JobOutcome(job.id, summary="s", prompt_tokens=3) for job in claimed[1:-1]], "w1")
            close_batch_if_done(session, batch_id)
        with sessions() as session:
            count_expired(session, batch_id)
            batch_counts(session, batch_id)
            list_batches(session, 20)
            rows = iter_results(session, batch_id, page=1000)
            for _ in range(1500):
                next(rows)
            writer = JobWriter(session, get_batch(session, batch_id))
            assert writer._first("doc-500000") is not None  # a duplicate id settled by the unique index
        list(zip(range(2), iter_claimable_chunks(sessions, batch_id, 256), strict=False))
    finally:
        event.remove(database, "before_cursor_execute", capture)
    on_jobs = [(statement, parameters) for statement, parameters in sent if ON_JOBS.search(statement)]
    assert len(on_jobs) >= 10
    with database.connect() as connection:
        plans = {
            statement: "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))
            for statement, parameters in on_jobs
        }
    scans = {statement: plan for statement, plan in plans.items() if "Seq Scan on jobs" in plan}
    assert not scans, json.dumps(scans, indent=1)


def test_status_reads_counters_not_jobs(million: tuple[Engine, str]) -> None:
    database, batch_id = million
    sent: list[str] = []

    def capture(connection: Any, cursor: Any, statement: str, *rest: Any) -> None:
        sent.append(statement)

    event.listen(database, "before_cursor_execute", capture)
    try:
        with session_factory(database)() as session:
            counts = counts_of(get_batch(session, batch_id))
    finally:
        event.remove(database, "before_cursor_execute", capture)
    assert counts.total >= ROWS - 1
    assert not [statement for statement in sent if ON_JOBS.search(statement)]


SUBMIT = """
import sys
from tests.conftest import peak_rss_mib
from models.settings import Settings
from producer.client import Client
count = int(sys.argv[1])
client = Client(Settings(database_url=sys.argv[2], chunk_size=256))
documents = ({"id": f"d{i}", "text": f"Document {i} opens here. It goes on a while." * 3} for i in range(count))
submission = client.submit(documents, model="lead", publish=False)
assert submission.accepted == count
print(int(peak_rss_mib() * 1024))
"""


def test_submitting_holds_a_bounded_number_of_documents(pg_url: str) -> None:
    """Peak RSS of a submit of 200,000 documents (a generator) against one of 20,000: flat."""

    def peak_kib(count: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", SUBMIT, str(count), pg_url], capture_output=True, text=True, cwd=ROOT, timeout=600
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    small, large = peak_kib(20_000), peak_kib(200_000)
    assert large - small < 24 * 1024, (small, large)  # ten times the documents, not ten times the memory
