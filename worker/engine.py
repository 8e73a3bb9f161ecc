"""What the chunk processor needs of an engine: claimed jobs in, outcomes out.

Two kinds exist: the generation pipeline over a backend (`worker.pipeline`, `worker.backends`),
and the extractive `lead` engine, which reads sentences and generates nothing. Which one
serves a model is `worker.loading`'s choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from models.claims import ClaimedJob, JobOutcome
from models.prompts import PromptPlan
from worker.backends.base import AdapterSpec


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Per-batch generation settings, stored with the batch."""

    max_new_tokens: int
    long_documents: str = "map-reduce"  # or "truncate": documents over the model's context
    adapter: AdapterSpec | None = None  # the batch's tuned adapter (on its final prompts, not map pieces)
    trim: str = "sentence"  # or "none": a summary that hit max_new_tokens is cut back to its last sentence

    @classmethod
    def from_batch(cls, params: dict[str, object], adapter: AdapterSpec | None = None) -> GenerationParams:
        return cls(
            max_new_tokens=int(str(params["max_new_tokens"])),
            long_documents=str(params.get("long_documents") or "map-reduce"),
            adapter=adapter,
            trim=str(params.get("trim") or "sentence"),  # batches from before the option: the default
        )


class Engine(Protocol):
    """Turns claimed jobs into outcomes, one generation batch at a time.

    `run` yields the outcomes of each generation batch as soon as it is done, so the
    caller can commit them; every job handed in gets exactly one outcome. Errors of one
    document become that document's outcome, never an exception.
    """

    name: str  # the model name batches ask for

    def run(
        self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams
    ) -> Iterator[list[JobOutcome]]: ...
