"""The extractive `lead` engine: the first N sentences of the document (the Lead-3 baseline)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from models.store import ClaimedJob, JobOutcome
from worker.engines.base import GenerationParams
from worker.splitting import is_cjk, sentences_of


def lead(text: str, n: int) -> str:
    """The first `n` sentences, joined (CJK sentences without a space)."""
    picked = sentences_of(text)[:n]
    joined = ""
    for sentence in picked:
        if joined and not is_cjk(joined[-1]):
            joined += " "
        joined += sentence
    return joined


class LeadEngine:
    """Selectable as model `lead` (3 sentences) or `lead-N`; ignores the prompt."""

    def __init__(self, name: str, sentences: int) -> None:
        self.name = name
        self.sentences = sentences

    def run(self, jobs: Sequence[ClaimedJob], prompt: object, params: GenerationParams) -> Iterator[list[JobOutcome]]:
        started = time.perf_counter()
        outcomes = []
        for job in jobs:
            summary = lead(job.text, self.sentences)
            if summary:
                outcomes.append(
                    JobOutcome(job.id, summary=summary, output_tokens=len(summary.split()), pieces=1, levels=1)
                )
            else:
                outcomes.append(JobOutcome(job.id, error="no sentence found in the document"))
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            outcome.generation_seconds = elapsed
        yield outcomes
