"""The extractive `lead` engine: the first N sentences of the document (the Lead-3 baseline)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence

from models.store import ClaimedJob, JobOutcome
from worker.engines.base import GenerationParams

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace, or at CJK
# full stops, which need no space after them.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+|(?<=[。！？])")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, in order, without surrounding whitespace (lines count as breaks too)."""
    sentences: list[str] = []
    for line in text.splitlines():
        sentences.extend(s.strip() for s in _SENTENCE_END.split(line) if s and s.strip())
    return sentences


def lead(text: str, n: int) -> str:
    """The first `n` sentences, joined (CJK sentences without a space)."""
    picked = split_sentences(text)[:n]
    joined = ""
    for sentence in picked:
        if joined and not _is_cjk(joined[-1]):
            joined += " "
        joined += sentence
    return joined


def _is_cjk(char: str) -> bool:
    return "\u3000" <= char <= "\u9fff" or "\uff00" <= char <= "\uffef"


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
                outcomes.append(JobOutcome(job.id, summary=summary, output_tokens=len(summary.split())))
            else:
                outcomes.append(JobOutcome(job.id, error="no sentence found in the document"))
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            outcome.generation_seconds = elapsed
        yield outcomes
