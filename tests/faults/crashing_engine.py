"""A plugin engine for fault tests: the lead engine, except that a document containing
POISON kills the worker process outright (as a segfault or the kernel's OOM killer would)."""

from __future__ import annotations

import os
import signal

from worker.lead import LeadEngine


class CrashingEngine(LeadEngine):
    def run(self, jobs, template, params):
        if any("POISON" in job.text for job in jobs):
            os.kill(os.getpid(), signal.SIGKILL)
        yield from super().run(jobs, template, params)


def make(name, settings):
    return CrashingEngine(name, 1)
