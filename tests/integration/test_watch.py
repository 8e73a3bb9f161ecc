"""`status --watch` exits like `run`: 0 all succeeded, 3 some did not, 5 on its --timeout."""

from __future__ import annotations

import pytest

from models.settings import Settings
from tests.conftest import SAMPLE, sumfleet

pytestmark = pytest.mark.services


def test_watch_times_out_then_reports_success_then_cancellation(fleet_settings: Settings, start_worker) -> None:
    settings = fleet_settings.model_copy(update={"model": "lead"})
    submitted = sumfleet("submit", str(SAMPLE), settings=settings)
    batch = submitted.stdout.decode().strip()
    waited = sumfleet("status", batch, "--watch", "--timeout", "1.5", "--interval", "0.2", settings=settings)
    assert waited.returncode == 5, waited.stderr.decode()  # no worker yet: still queued
    assert f"batch {batch} still queued after 1.5s" in waited.stderr.decode()

    start_worker(settings, "lead")
    done = sumfleet("status", batch, "--watch", "--timeout", "120", "--interval", "0.2", settings=settings)
    assert done.returncode == 0, done.stderr.decode()
    assert "failed=0" in done.stderr.decode()  # the live bar shows failures

    other = sumfleet("submit", str(SAMPLE), "--queue", "sumfleet.nobody-listens", settings=settings)
    cancelled = other.stdout.decode().strip()
    assert sumfleet("cancel", cancelled, settings=settings).returncode == 0
    ended = sumfleet("status", cancelled, "--watch", "--timeout", "30", settings=settings)
    assert ended.returncode == 3, ended.stderr.decode()  # ended, but not every document succeeded
