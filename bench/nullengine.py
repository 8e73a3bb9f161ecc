"""A do-nothing engine for measuring the bookkeeping around the model: `python:bench.nullengine:factory`.

Each job "succeeds" at once with a one-word summary, so what a benchmark measures is the
queue, the database and the worker's own code, never generation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from models.claims import ClaimedJob, JobOutcome
from models.prompts import PromptPlan
from models.settings import Settings
from worker.engine import GenerationParams


class NullEngine:
    """Answers every job at once."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams
    ) -> Iterator[list[JobOutcome]]:
        yield [JobOutcome(job.id, summary="ok", prompt_tokens=1, output_tokens=1, pieces=1, levels=1) for job in jobs]


def factory(name: str, settings: Settings) -> NullEngine:
    return NullEngine(name)
