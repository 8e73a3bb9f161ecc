"""A plugin engine for takeover, cancel and lost-message tests: the lead engine, one document per
generation batch, except that a document containing WAIT:<path> holds its generation batch until
that file exists (so a test can kill or cancel mid-chunk), and HELD_ENGINE_DELAY (seconds, from the
environment) is slept before every generation batch (so a queue drains slowly)."""

from __future__ import annotations

import os
import re
import time

from worker.lead import LeadEngine

_WAIT = re.compile(r"WAIT:(\S+)")
WAIT_LIMIT = 300.0  # seconds a gate is waited for at most


class HeldEngine(LeadEngine):
    def run(self, jobs, *args, **kwargs):
        delay = float(os.environ.get("HELD_ENGINE_DELAY") or 0)
        for job in jobs:
            time.sleep(delay)
            gate = _WAIT.search(job.text)
            deadline = time.monotonic() + WAIT_LIMIT
            while gate and not os.path.exists(gate.group(1)) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield from super().run([job], *args, **kwargs)


def make(name, settings):
    return HeldEngine(name, 3)
