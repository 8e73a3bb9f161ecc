"""The generation pipeline over two backends: the toy one (tests/worker/toy_backend.py, written
against the narrow protocol only) and the transformers one with the real default model.

The same tests run on both: packing under the budget and batch size, one failing row failing
alone, out-of-memory halving, rows of different limits sharing a call, map-reduce batched with
short documents, and truncation that leaves room for each row's own output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from models.claims import ClaimedJob, JobOutcome
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from tests.conftest import SAMPLE
from tests.worker.longdoc import long_document
from tests.worker.toy_backend import ToyBackend, ToyOutOfMemory
from worker.backends.base import Backend, Generated, Row
from worker.engine import GenerationParams
from worker.loading import load_engine
from worker.pipeline import GenerationPipeline

PLAN = PromptPlan(TEMPLATES["one-sentence"])


@dataclass
class Kit:
    """A backend and what a test needs to know about it."""

    backend: Backend
    out_of_memory: Callable[[], BaseException]
    exact_across_batches: bool = True  # the same text whatever rows share a call (False: near-ties may flip)

    def pipeline(self, **settings: Any) -> GenerationPipeline:
        return GenerationPipeline("m", self.backend, Settings(database_url="sqlite://", **settings))


@pytest.fixture(scope="module")
def transformers_backend() -> Backend:
    # float32: batched-vs-alone comparisons are about the code; bf16 flips near-tied tokens more often
    engine = load_engine("smollm2", Settings(database_url="sqlite://", engine="transformers", dtype="float32"))
    assert isinstance(engine, GenerationPipeline)
    return engine.backend


@pytest.fixture(scope="module")
def llamacpp_backend() -> Backend:
    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (sumfleet[llamacpp])")
    # packed calls, which these tests watch; its continuous batching is tested in test_llamacpp.py
    engine = load_engine("smollm2", Settings(database_url="sqlite://", engine="llama.cpp", batching="static"))
    assert isinstance(engine, GenerationPipeline)
    return engine.backend


@pytest.fixture(scope="module")
def ctranslate2_backend() -> Backend:
    pytest.importorskip("ctranslate2", reason="the CTranslate2 backend needs ctranslate2 (sumfleet[ctranslate2])")
    engine = load_engine("smollm2", Settings(database_url="sqlite://", engine="ctranslate2"))
    assert isinstance(engine, GenerationPipeline)
    return engine.backend


@pytest.fixture(
    params=[
        "toy",
        pytest.param("transformers", marks=pytest.mark.model),
        pytest.param("llama.cpp", marks=pytest.mark.model),
        pytest.param("ctranslate2", marks=pytest.mark.model),
    ]
)
def kit(request: pytest.FixtureRequest) -> Kit:
    if request.param == "toy":
        return Kit(ToyBackend(), lambda: ToyOutOfMemory("out of memory"))
    if request.param == "ctranslate2":
        # what CTranslate2 raises when an allocation fails; int8 kernels differ with the rows of a call
        return Kit(
            request.getfixturevalue("ctranslate2_backend"),
            lambda: RuntimeError("aligned_alloc: failed to allocate memory"),
            exact_across_batches=False,
        )
    if request.param == "llama.cpp":
        from worker.backends.llamacpp import KVCacheFull

        # llama.cpp's kernels differ with the rows of a call: a near-tie can flip a greedy token
        return Kit(request.getfixturevalue("llamacpp_backend"), lambda: KVCacheFull("full"), exact_across_batches=False)
    import torch

    return Kit(request.getfixturevalue("transformers_backend"), lambda: torch.OutOfMemoryError("CUDA out of memory"))


@contextmanager
def watched(
    backend: Backend, fail: Callable[[Sequence[Row]], BaseException | None] = lambda rows: None
) -> Iterator[list[list[Row]]]:
    """Record the rows of every generate call (and fail the calls `fail` picks); the real one runs."""
    calls: list[list[Row]] = []
    real = backend.generate

    def generate(rows: Sequence[Row]) -> Any:
        calls.append(list(rows))
        error = fail(rows)
        if error is not None:
            raise error
        return real(rows)

    backend.generate = generate  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del backend.generate


def _jobs(count: int = 8) -> list[ClaimedJob]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:count]
    return [ClaimedJob(i, r["id"], r["text"], 1) for i, r in enumerate(rows)]


def _run(pipeline: GenerationPipeline, jobs: list[ClaimedJob], params: GenerationParams) -> dict[int, JobOutcome]:
    return {o.job_id: o for batch in pipeline.run(jobs, PLAN, params) for o in batch}


def test_rows_are_packed_shortest_first_under_the_batch_size_and_budget(kit: Kit) -> None:
    jobs, params = _jobs(), GenerationParams(max_new_tokens=4)
    with watched(kit.backend) as calls:
        outcomes = _run(kit.pipeline(max_batch_size=3, token_budget=1_000_000), jobs, params)
    assert sorted(outcomes) == [job.id for job in jobs]
    assert all(o.error is None and o.summary and o.output_tokens <= 4 for o in outcomes.values())
    assert [len(call) for call in calls] == [3, 3, 2]
    lengths = [len(row.ids) for call in calls for row in call]
    assert lengths == sorted(lengths)
    budget = (max(lengths) + 4) * 2  # room for two of the longest rows per call
    with watched(kit.backend) as calls:
        _run(kit.pipeline(max_batch_size=8, token_budget=budget), jobs, params)
    assert sum(len(call) for call in calls) == len(jobs)
    for call in calls:
        assert len(call) == 1 or (max(len(row.ids) for row in call) + 4) * len(call) <= budget


def test_a_failing_row_fails_alone(kit: Kit) -> None:
    jobs = _jobs(4)
    pipeline = kit.pipeline(max_batch_size=8)
    _, poison = pipeline.prompter.encode(PLAN, jobs[2].text, 4)

    def fail(rows: Sequence[Row]) -> BaseException | None:
        return RuntimeError("device-side assert triggered") if any(r.ids == poison for r in rows) else None

    with watched(kit.backend, fail) as calls:
        outcomes = _run(pipeline, jobs, GenerationParams(max_new_tokens=4))
    assert outcomes[2].error == "generation failed: RuntimeError: device-side assert triggered"
    assert all(outcomes[i].summary and outcomes[i].error is None for i in (0, 1, 3))
    assert len(calls[0]) == 4 and any(len(call) == 1 and call[0].ids == poison for call in calls)


def test_out_of_memory_halves_the_call(kit: Kit) -> None:
    jobs, params = _jobs(4), GenerationParams(max_new_tokens=4)
    expected = _run(kit.pipeline(max_batch_size=4), jobs, params)
    with watched(kit.backend, lambda rows: kit.out_of_memory() if len(rows) > 2 else None) as calls:
        outcomes = _run(kit.pipeline(max_batch_size=4), jobs, params)
    assert [len(call) for call in calls] == [4, 2, 2]
    assert all(o.error is None and o.summary for o in outcomes.values()) and outcomes.keys() == expected.keys()
    if kit.exact_across_batches:
        assert {i: o.summary for i, o in outcomes.items()} == {i: o.summary for i, o in expected.items()}


def test_out_of_memory_lowers_the_budget_for_the_rest_of_the_chunk(kit: Kit) -> None:
    pipeline = kit.pipeline(max_batch_size=4, token_budget=100_000)
    with watched(kit.backend, lambda rows: kit.out_of_memory() if len(rows) > 2 else None) as calls:
        outcomes = _run(pipeline, _jobs(8), GenerationParams(max_new_tokens=2))
    assert pipeline.budget < 100_000
    assert [len(call) for call in calls[:3]] == [4, 2, 2]  # the first call fails and is split
    assert max(len(call) for call in calls[3:]) <= 2  # later calls are packed under the lowered budget
    assert sum(len(call) for call in calls[3:]) == 4  # the other four documents, each generated once
    assert all(o.error is None for o in outcomes.values()) and len(outcomes) == 8


def test_rows_with_different_limits_share_a_call(kit: Kit) -> None:
    request = {"messages": [{"role": "user", "content": "Name one colour of the sea."}], "max_new_tokens": 3}
    chat = ClaimedJob(50, "chat-1", "Name one colour.", 1, request)
    (document,) = _jobs(1)
    with watched(kit.backend) as calls:
        outcomes = _run(kit.pipeline(), [chat, document], GenerationParams(max_new_tokens=12))
    assert [sorted(row.max_new_tokens for row in call) for call in calls] == [[3, 12]]
    assert outcomes[50].error is None and 0 < outcomes[50].output_tokens <= 3
    assert outcomes[50].prompt_variant == "chat"
    assert outcomes[document.id].error is None and 3 < outcomes[document.id].output_tokens <= 12


def test_a_long_document_is_map_reduced_in_calls_shared_with_short_ones(kit: Kit) -> None:
    long = ClaimedJob(1, "report", long_document(600), 1)
    (short,) = _jobs(1)
    short = ClaimedJob(2, short.doc_id, short.text, 1)
    pipeline = kit.pipeline(max_input_tokens=256)
    with watched(kit.backend) as calls:
        outcomes = _run(pipeline, [long, short], GenerationParams(max_new_tokens=8))
    assert outcomes[1].error is None and outcomes[1].summary
    assert outcomes[1].pieces is not None and outcomes[1].pieces >= 3
    assert outcomes[1].levels is not None and outcomes[1].levels >= 2
    assert (outcomes[2].pieces, outcomes[2].levels, outcomes[2].error) == (1, 1, None)
    assert all(len(row.ids) <= 256 for call in calls for row in call)
    _, short_ids = pipeline.prompter.encode(PLAN, short.text, 8)
    first = calls[0]
    assert any(row.ids == short_ids for row in first) and sum(row.max_new_tokens > 8 for row in first) >= 3
    assert outcomes[1].prompt_tokens > 256  # every level's prompts are counted


def test_truncation_leaves_room_for_the_batchs_own_output() -> None:
    """Regression: the prompt's room came from the worker's SUMFLEET_MAX_NEW_TOKENS, not the
    batch's max_new_tokens, so a 256-position model failed on a batch asking for more."""
    backend = ToyBackend(context_length=256)
    pipeline = GenerationPipeline("m", backend, Settings(database_url="sqlite://", max_new_tokens=8))
    job = ClaimedJob(1, "long", long_document(600), 1)
    (outcome,) = [o for batch in pipeline.run([job], PLAN, GenerationParams(40, "truncate")) for o in batch]
    assert outcome.error is None and outcome.prompt_tokens is not None
    assert outcome.prompt_tokens + 40 <= 256
    with pytest.raises(IndexError):  # what the old room (256 - 8) would have led to
        backend.generate([Row(list(range(2, 250)), 40)])


def test_generation_seconds_count_each_call_once_for_a_map_reduced_document() -> None:
    """Regression: every piece of a document added the whole time of the call it shared with its
    other pieces (a 6.5k-word paper reported 5,235 s). Each call here reports 1 second."""
    backend = ToyBackend(context_length=256)
    real = backend.generate
    backend.generate = lambda rows: [Generated(g.tokens, 1.0) for g in real(rows)]  # type: ignore[method-assign]
    pipeline = GenerationPipeline("m", backend, Settings(database_url="sqlite://", max_input_tokens=256))
    long = ClaimedJob(1, "report", long_document(600), 1)
    (short,) = _jobs(1)
    outcomes = _run(pipeline, [long, ClaimedJob(2, short.doc_id, short.text, 1)], GenerationParams(max_new_tokens=8))
    assert outcomes[1].error is None and outcomes[1].pieces is not None and outcomes[1].pieces >= 3
    rows_of_long = sum(len(call) for call in backend.calls) - 1  # every row but the short document's one
    assert rows_of_long > len(backend.calls)  # pieces shared calls: counting per row would differ
    assert outcomes[1].generation_seconds == len(backend.calls)  # the long document was in every call
    assert outcomes[2].generation_seconds == 1.0


def test_a_plugin_backend_runs_under_the_pipeline() -> None:
    engine = load_engine("python:tests.worker.toy_backend:factory", Settings(database_url="sqlite://"))
    assert isinstance(engine, GenerationPipeline) and isinstance(engine.backend, ToyBackend)
    outcomes = _run(engine, _jobs(2), GenerationParams(max_new_tokens=5))
    assert all(o.error is None and o.summary for o in outcomes.values())
