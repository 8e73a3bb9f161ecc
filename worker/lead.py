"""The extractive `lead` engine: the first N sentences of the document (the Lead-3 baseline).

It reads sentences and generates nothing, so it is an engine of its own rather than a
backend under the generation pipeline; it ignores the prompt. Its outputs end where the model
"chose" to (finish reason `stop`: no token limit applies) and are checked for emptiness and
repetition only: copying the document's opening is what it is for, so it is never an `echo`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from models.claims import ClaimedJob, JobOutcome
from models.prompts import PromptPlan
from models.quality import warnings_for
from models.text import lead
from worker.engine import GenerationParams


class LeadEngine:
    """Selectable as model `lead` (3 sentences) or `lead-N`."""

    def __init__(self, name: str, sentences: int) -> None:
        self.name = name
        self.sentences = sentences

    def run(
        self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams
    ) -> Iterator[list[JobOutcome]]:
        started = time.perf_counter()
        outcomes = []
        for job in jobs:
            summary = lead(job.text, self.sentences)
            if summary:
                outcomes.append(
                    JobOutcome(
                        job.id,
                        summary=summary,
                        output_tokens=len(summary.split()),
                        pieces=1,
                        levels=1,
                        finish_reason="stop",
                        warnings=warnings_for(summary, finish_reason="stop"),
                    )
                )
            else:
                outcomes.append(JobOutcome(job.id, error="no sentence found in the document", warnings=["empty"]))
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            outcome.generation_seconds = elapsed
        yield outcomes
