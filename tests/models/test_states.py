from __future__ import annotations

import pytest

from models.errors import InvalidTransition
from models.settings import Settings, load_settings
from models.errors import ConfigError
from models.states import JobState, check_job_transition, sources_for


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
    with pytest.raises(ConfigError, match="visibility_timeout .* must exceed task_time_limit"):
        load_settings(task_time_limit=100, visibility_timeout=50)
