"""The worker process's own settings: threads divided among the processes of one worker."""

from __future__ import annotations

import os

import pytest

from models.settings import Settings
from worker.app import threads_per_process


def test_a_workers_processes_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads_per_process(Settings(), 1) == 4
    assert threads_per_process(Settings(), 2) == 2  # -c 2: two processes of two threads, not of four
    assert threads_per_process(Settings(), 8) == 1  # never below one
    assert threads_per_process(Settings(threads=3), 2) == 3  # SUMFLEET_THREADS wins
