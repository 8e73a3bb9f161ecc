"""The store on both databases: submit rows, claim, conditional finish, batch closing, migrations."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, update
from sqlalchemy.orm import Session

from models.claims import JobOutcome, claim_jobs, finish_jobs, give_up_exhausted, release_jobs
from models.counters import counts_of, differences, recount
from models.db import current_revision, ensure_schema, head_revision, open_database, session_factory
from models.errors import BatchNotFoundError, DatabaseError
from models.job_writer import JobWriter, SeenIds, add_jobs
from models.states import JobState
from models.store import (
    batch_counts,
    cancel_batch,
    close_batch_if_done,
    create_batch,
    get_batch,
    iter_claimable_chunks,
    iter_job_id_chunks,
    iter_results,
    mark_batch_started,
    utcnow,
)
from models.tables import Base, Job


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def database(request, tmp_path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 's.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = open_database(url)
    ensure_schema(engine, migrate=True)
    yield engine
    engine.dispose()


def assert_counters_agree(session: Session, batch_id: str) -> None:
    """The batch's counters equal a recount of its jobs."""
    assert differences(counts_of(get_batch(session, batch_id)), recount(session, batch_id)) == []


def _batch(sessions, n: int = 5) -> tuple[str, list[int]]:
    with sessions.begin() as session:
        batch = create_batch(
            session,
            model="lead",
            queue="q",
            prompt_name="one-sentence",
            prompt_template="{document}",
            params={"max_new_tokens": 8},
            source="test",
        )
        add_jobs(session, batch, ({"doc_id": f"d{i}", "text": f"text {i}"} for i in range(n)))
        batch_id = batch.id
    ids = [i for chunk in iter_job_id_chunks(sessions, batch_id, 100, [JobState.QUEUED]) for i in chunk]
    return batch_id, ids


def test_migrations_match_the_tables(database: Engine) -> None:
    assert current_revision(database) == head_revision()
    with database.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_finish_reason_and_warnings_are_stored(database: Engine) -> None:
    """Migration 0010's columns: written by `finish_jobs` (one VALUES statement on PostgreSQL), read back
    as a string and a JSON list; a job without them keeps NULL."""
    sessions = session_factory(database)
    batch_id, ids = _batch(sessions, 4)
    with sessions.begin() as session:
        claim_jobs(session, ids, "w1")
    outcomes = [
        JobOutcome(ids[0], summary="Cut short.", finish_reason="length", warnings=[]),
        JobOutcome(ids[1], summary="a a a a a a", finish_reason="length", warnings=["repetition", "truncated"]),
        JobOutcome(ids[2], error="the model produced an empty summary", finish_reason="stop", warnings=["empty"]),
        JobOutcome(ids[3], summary="by a plugin engine"),  # says neither
    ]
    with sessions.begin() as session:
        assert finish_jobs(session, outcomes, "w1") == 4
    with sessions() as session:
        jobs = list(iter_results(session, batch_id))
        assert [(j.finish_reason, j.warnings) for j in jobs] == [
            ("length", []),
            ("length", ["repetition", "truncated"]),
            ("stop", ["empty"]),
            (None, None),
        ]
        # SQL NULL, not a JSON null, for the job without warnings (queries can tell them apart)
        unchecked = select(Job.id).where(Job.batch_id == batch_id, Job.warnings.is_(None))
        assert session.scalars(unchecked).all() == [ids[3]]


def test_migration_0010_goes_down_and_up(database: Engine) -> None:
    from alembic import command

    from models.db import _alembic_config

    sessions = session_factory(database)
    batch_id, _ = _batch(sessions, 1)
    command.downgrade(_alembic_config(database), "0009")
    assert current_revision(database) == "0009"
    with database.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
    assert "finish_reason" not in columns and "warnings" not in columns
    command.upgrade(_alembic_config(database), "head")
    assert current_revision(database) == head_revision()
    with sessions() as session:  # rows from before the migration read as unknown
        (job,) = iter_results(session, batch_id)
        assert (job.finish_reason, job.warnings) == (None, None)


def test_jobs_are_added_and_chunked_in_order(database: Engine) -> None:
    sessions = session_factory(database)
    batch_id, ids = _batch(sessions, 5)
    assert ids == sorted(ids) and len(ids) == 5
    chunks = list(iter_job_id_chunks(sessions, batch_id, 2, [JobState.QUEUED]))
    assert [len(c) for c in chunks] == [2, 2, 1] and [i for c in chunks for i in c] == ids
    with sessions() as session:
        assert get_batch(session, batch_id).total == 5
        assert batch_counts(session, batch_id).by_state == {"queued": 5}
        assert_counters_agree(session, batch_id)


def test_claim_finish_is_exactly_once(database: Engine) -> None:
    sessions = session_factory(database)
    batch_id, ids = _batch(sessions, 3)
    with sessions.begin() as session:
        claimed = claim_jobs(session, ids, "w1", lease_seconds=3600)
        mark_batch_started(session, batch_id)
    assert [c.id for c in claimed] == ids and all(c.attempts == 1 for c in claimed)
    assert claimed[0].doc_id == "d0" and claimed[0].text == "text 0"
    with sessions.begin() as session:  # a duplicate delivery while w1's lease holds takes nothing
        assert claim_jobs(session, ids, "w2") == []
        assert list(iter_claimable_chunks(sessions, batch_id, 10)) == []
    with sessions.begin() as session:  # w1 hangs past its lease (simulated by shortening it)
        session.execute(update(Job).where(Job.id.in_(ids[:2])).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert list(iter_claimable_chunks(sessions, batch_id, 10)) == [ids[:2]]

    # the chunk is redelivered to w2: it takes over the two jobs whose lease ran out
    with sessions.begin() as session:
        retaken = claim_jobs(session, ids, "w2")
    assert [c.attempts for c in retaken] == [2, 2]
    with sessions.begin() as session:  # w1's late results for the taken-over jobs are not written
        written = finish_jobs(session, [JobOutcome(i, summary="from w1") for i in ids], "w1")
    assert written == 1
    with sessions.begin() as session:
        assert finish_jobs(session, [JobOutcome(ids[0], summary="w2"), JobOutcome(ids[1], error="boom")], "w2") == 2
    with sessions.begin() as session:  # a third delivery finds nothing left to do
        assert claim_jobs(session, ids, "w3") == []
        assert finish_jobs(session, [JobOutcome(ids[0], summary="again")], "w2") == 0
        assert close_batch_if_done(session, batch_id)
    with sessions() as session:
        rows = {job.doc_id: job for job in iter_results(session, batch_id, page=2)}
        batch = get_batch(session, batch_id)
    assert rows["d0"].summary == "w2" and rows["d0"].state == "succeeded" and rows["d0"].worker == "w2"
    assert rows["d1"].state == "failed" and rows["d1"].error == "boom" and rows["d1"].summary is None
    assert rows["d2"].summary == "from w1" and rows["d2"].attempts == 1
    assert batch.state == "completed" and batch.started_at and batch.finished_at
    assert counts_of(batch).by_state == {"succeeded": 2, "failed": 1}
    with sessions() as session:
        assert_counters_agree(session, batch_id)


def test_batch_stays_open_while_jobs_remain(database: Engine) -> None:
    sessions = session_factory(database)
    batch_id, ids = _batch(sessions, 2)
    with sessions.begin() as session:
        claim_jobs(session, ids[:1], "w")
        finish_jobs(session, [JobOutcome(ids[0], summary="s")], "w")
        assert not close_batch_if_done(session, batch_id)
    with sessions() as session:
        assert get_batch(session, batch_id).state == "queued"
        assert batch_counts(session, batch_id).by_state == {"queued": 1, "succeeded": 1}
        assert_counters_agree(session, batch_id)


def test_unknown_batch_is_a_clear_error(database: Engine) -> None:
    with session_factory(database)() as session, pytest.raises(BatchNotFoundError, match="no batch 'nope'"):
        get_batch(session, "nope")


def test_worker_refuses_an_unmigrated_database(tmp_path) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseError, match="sumfleet db upgrade"):
        ensure_schema(engine, migrate=False)


def test_unreachable_database_is_a_clear_error() -> None:
    engine = open_database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(
        DatabaseError, match=re.escape("cannot reach database postgresql+psycopg://nobody@127.0.0.1:1/none")
    ):
        ensure_schema(engine, migrate=True)


def test_a_job_whose_worker_died_too_often_fails_with_the_reason(database: Engine) -> None:
    sessions = session_factory(database)
    batch_id, ids = _batch(sessions, 2)
    for attempt in range(3):  # three deliveries, each worker dies (its lease runs out)
        with sessions.begin() as session:
            assert give_up_exhausted(session, ids, max_attempts=3) == 0
            assert len(claim_jobs(session, ids[:1], f"w{attempt}", lease_seconds=-1)) == 1
    with sessions.begin() as session:
        assert give_up_exhausted(session, ids, max_attempts=3) == 1
        assert claim_jobs(session, ids[:1], "w9") == []
    with sessions() as session:
        rows = {job.doc_id: job for job in iter_results(session, batch_id)}
    assert rows["d0"].state == "failed" and rows["d0"].attempts == 3
    assert (rows["d0"].error or "").startswith("gave up after 3 attempts: the worker process died")
    assert rows["d1"].state == "queued"


def test_counters_follow_every_move(database: Engine) -> None:
    """Claims, take-overs, give-ups, releases, outcomes with tokens and a cancel, each checked against a recount."""
    sessions = session_factory(database)
    batch_id, ids = _batch(sessions, 8)
    with sessions.begin() as session:
        claim_jobs(session, ids[:5], "w1")
        assert batch_counts(session, batch_id).by_state == {"queued": 3, "running": 5}
    with sessions.begin() as session:  # w1 died: two jobs' leases ran out, and one used up its attempts
        session.execute(update(Job).where(Job.id.in_(ids[:2])).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.execute(update(Job).where(Job.id == ids[0]).values(attempts=3))
    with sessions.begin() as session:
        assert give_up_exhausted(session, ids[:2], max_attempts=3) == 1
        assert [job.id for job in claim_jobs(session, ids[:2], "w2")] == [ids[1]]  # taken over: still running
        assert release_jobs(session, ids[2:3], "w1") == [ids[2]]  # a graceful stop gives one back
        finish_jobs(
            session,
            [JobOutcome(ids[1], summary="s", prompt_tokens=10, output_tokens=3), JobOutcome(ids[3], error="e")],
            "w2",
        )  # ids[3] is w1's: not written
        finish_jobs(session, [JobOutcome(ids[3], summary="t", prompt_tokens=7, output_tokens=2)], "w1")
        assert_counters_agree(session, batch_id)
    with sessions.begin() as session:
        cancelled, running = cancel_batch(session, batch_id)
        counts = batch_counts(session, batch_id)
        assert_counters_agree(session, batch_id)
    assert (cancelled, running) == (4, 1)  # ids[2] and the three never claimed; ids[4] still runs
    assert counts.by_state == {"failed": 1, "succeeded": 2, "cancelled": 4, "running": 1}
    assert (counts.prompt_tokens, counts.output_tokens) == (17, 5)


def test_duplicate_ids_are_found_in_flat_memory(database: Engine) -> None:
    sessions = session_factory(database)
    with sessions.begin() as session:
        batch = create_batch(
            session, model="lead", queue="q", prompt_name="p", prompt_template="{document}", params={}, source=None
        )
        writer = JobWriter(session, batch, page_rows=3)  # pages of 3: duplicates both written and pending
        found = {f"d{i}": writer.add(f"d{i}", "text", line=i + 1) for i in range(7)}
        assert set(found.values()) == {None}
        assert writer.add("d1", "again", line=8).first_line == 2  # written already: found in the table
        assert writer.add("d6", "again", line=9).first_line == 7  # still pending
        assert writer.close() == 7
        assert get_batch(session, batch.id).total == 7
        assert_counters_agree(session, batch.id)


def test_the_bloom_filter_never_misses_and_rarely_guesses() -> None:
    seen = SeenIds(bits=1 << 20)
    assert not any(seen.add(f"id-{i}") for i in range(20_000))
    assert all(seen.add(f"id-{i}") for i in range(20_000))
    false_maybes = sum(seen.add(f"other-{i}") for i in range(20_000))
    assert false_maybes < 200  # about 0.01% expected at this fill
