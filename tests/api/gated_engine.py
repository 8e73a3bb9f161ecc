"""A plugin engine for the API tests: the lead engine, except that a request whose text
contains FAIL fails (as a generation error would), and one containing WAIT:<path> holds its
whole chunk until that file exists (so a test can cancel or expire a batch mid-run)."""

from __future__ import annotations

import os
import re
import time

from models.claims import JobOutcome
from worker.lead import LeadEngine

_WAIT = re.compile(r"WAIT:(\S+)")
WAIT_LIMIT = 120.0  # seconds a gate is waited for at most


class GatedEngine(LeadEngine):
    def run(self, jobs, *args, **kwargs):
        for job in jobs:
            gate = _WAIT.search(job.text)
            deadline = time.monotonic() + WAIT_LIMIT
            while gate and not os.path.exists(gate.group(1)) and time.monotonic() < deadline:
                time.sleep(0.05)
        failing = [job for job in jobs if "FAIL" in job.text]
        if failing:
            yield [JobOutcome(job.id, error="the test engine was asked to FAIL this request") for job in failing]
        rest = [job for job in jobs if "FAIL" not in job.text]
        if rest:
            yield from super().run(rest, *args, **kwargs)


def make(name, settings):
    return GatedEngine(name, 3)
