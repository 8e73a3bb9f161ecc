from __future__ import annotations

import pytest

from models import states
from models.claims import claim_jobs, release_jobs
from models.db import ensure_schema, open_database, session_factory
from models.errors import ConfigError, InvalidTransition
from models.job_writer import add_jobs
from models.settings import Settings, load_settings
from models.states import JobState, check_job_transition, moves, sources_for
from models.store import create_batch


def test_finished_jobs_never_change() -> None:
    for final in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        assert final.finished
        for target in JobState:
            with pytest.raises(InvalidTransition):
                check_job_transition(final, target)


def test_conditional_update_sources() -> None:
    assert sources_for(JobState.RUNNING) == {JobState.QUEUED, JobState.RUNNING}
    assert sources_for(JobState.SUCCEEDED) == {JobState.RUNNING}
    check_job_transition(JobState.QUEUED, JobState.RUNNING)
    with pytest.raises(InvalidTransition, match="queued to succeeded"):
        check_job_transition(JobState.QUEUED, JobState.SUCCEEDED)


def test_moves_names_only_transitions_the_table_allows() -> None:
    assert moves(JobState.QUEUED, JobState.RUNNING) == ["running"]  # a graceful stop gives a job back
    with pytest.raises(InvalidTransition, match="job cannot go from succeeded to running"):
        moves(JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED)


def test_the_store_changes_states_through_the_table(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid a move in the table and the store refuses to make it: no UPDATE bypasses the table."""
    database = open_database(f"sqlite:///{tmp_path / 'states.db'}")
    ensure_schema(database, migrate=True)
    sessions = session_factory(database)
    with sessions.begin() as session:
        batch = create_batch(
            session, model="lead", queue="q", prompt_name="p", prompt_template="{document}", params={}, source=None
        )
        add_jobs(session, batch, [{"doc_id": "a", "text": "A."}])
    with sessions.begin() as session:
        (job,) = claim_jobs(session, [1], "w")
    table = dict(states.JOB_TRANSITIONS)
    table[JobState.RUNNING] = table[JobState.RUNNING] - {JobState.QUEUED}
    monkeypatch.setattr(states, "JOB_TRANSITIONS", table)
    with sessions.begin() as session, pytest.raises(InvalidTransition, match="running to queued"):
        release_jobs(session, [job.id], "w")
    monkeypatch.undo()
    with sessions.begin() as session:
        assert release_jobs(session, [job.id], "w") == [job.id]
    database.dispose()


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUMFLEET_CHUNK_SIZE", "7")
    monkeypatch.setenv("SUMFLEET_MODEL", "lead")
    settings = load_settings(model="lead-2", chunk_size=None)
    assert settings.chunk_size == 7 and settings.model == "lead-2"
    assert Settings().database_url == "sqlite:///sumfleet.db"


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUMFLEET_CHUNK_SIZE", "zero")
    with pytest.raises(ConfigError, match="SUMFLEET_CHUNK_SIZE"):
        load_settings()
    monkeypatch.delenv("SUMFLEET_CHUNK_SIZE")
    with pytest.raises(ConfigError, match=r"visibility_timeout .* must exceed task_time_limit"):
        load_settings(task_time_limit=100, visibility_timeout=50)
