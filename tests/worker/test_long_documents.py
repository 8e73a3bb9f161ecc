"""Documents over the model's context, with the real default model: map-reduce and truncate."""

from __future__ import annotations

import json

import pytest

from models.claims import ClaimedJob
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from tests.conftest import SAMPLE
from tests.worker.longdoc import long_document
from worker.engine import GenerationParams
from worker.loading import load_engine

pytestmark = pytest.mark.model
PLAN = PromptPlan(TEMPLATES["one-sentence"])
CONTEXT = 512  # a small usable context keeps the test quick and forces several levels


@pytest.fixture(scope="module")
def engine():
    # the transformers backend by name (its model's generate is recorded); auto may pick llama.cpp
    return load_engine("smollm2", Settings(database_url="sqlite://", engine="transformers", max_input_tokens=CONTEXT))


@pytest.fixture(scope="module")
def long_job() -> ClaimedJob:
    text = long_document(2600)
    assert len(text.split()) >= 2600
    return ClaimedJob(1, "report", text, 1)


@pytest.fixture(scope="module")
def short_job() -> ClaimedJob:
    row = json.loads(SAMPLE.read_text().splitlines()[0])
    return ClaimedJob(2, row["id"], row["text"], 1)


def _record_generate(engine):
    """Record the prompts of every generate() call (the real one still runs)."""
    real = engine.backend.model.generate
    calls: list[list[list[int]]] = []

    def generate(*args, **kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        calls.append([row[m.bool()].tolist() for row, m in zip(ids, mask, strict=False)])
        return real(*args, **kwargs)

    engine.backend.model.generate = generate
    return calls


def test_map_reduce_summarizes_pieces_batched_with_other_documents(engine, long_job, short_job) -> None:
    calls = _record_generate(engine)
    try:
        batches = list(engine.run([long_job, short_job], PLAN, GenerationParams(max_new_tokens=24)))
    finally:
        del engine.backend.model.generate
    outcomes = {o.job_id: o for batch in batches for o in batch}
    long, short = outcomes[1], outcomes[2]
    assert long.error is None and long.summary
    assert long.pieces is not None and long.pieces >= 7  # ~3,600 tokens in pieces of under 512
    assert long.levels is not None and long.levels >= 2
    assert (short.pieces, short.levels, short.error) == (1, 1, None)
    assert all(len(row) <= CONTEXT for call in calls for row in call)
    # the short document rode in a generate() call together with pieces of the long one
    piece_prompt = engine.backend.tokenizer.encode("Summarize the following part of a longer article")
    short_ids = engine.prompter.encode(PLAN, short_job.text, 24)[1]

    def has(row: list[int], needle: list[int]) -> bool:
        return any(row[i : i + len(needle)] == needle for i in range(len(row) - len(needle) + 1))

    mixed = [call for call in calls if short_ids in call and any(has(row, piece_prompt) for row in call)]
    assert mixed, [len(call) for call in calls]
    # pieces go several to a call, not one document at a time
    first_level = [row for call in calls for row in call if has(row, piece_prompt)]
    assert len(calls) < len(first_level)
    # the last level is the batch's own template over the joined piece summaries
    final = calls[-1][0]
    assert has(final, engine.backend.tokenizer.encode("Summarize the following article in one sentence:"))
    assert long.prompt_tokens > CONTEXT  # every level's prompts are counted


def test_truncate_cuts_the_document_to_the_context(engine, long_job) -> None:
    outcomes = [
        o for batch in engine.run([long_job], PLAN, GenerationParams(8, long_documents="truncate")) for o in batch
    ]
    (outcome,) = outcomes
    assert (outcome.pieces, outcome.levels, outcome.error) == (1, 1, None)
    assert outcome.prompt_tokens <= CONTEXT


def test_a_failing_piece_fails_its_document_with_where(engine, short_job) -> None:
    # a shorter report than long_job's (still several pieces): after the failed call the pipeline runs
    # that call's rows one at a time to find the one that fails, which is what makes this test slow
    long_job = ClaimedJob(1, "report", long_document(1300), 1)
    real = engine.backend.model.generate
    marker = engine.backend.tokenizer.encode("Chapter 3:")

    def generate(*args, **kwargs):
        for row in kwargs["input_ids"].tolist():
            if any(row[i : i + len(marker)] == marker for i in range(len(row))):
                raise RuntimeError("device-side assert triggered")
        return real(*args, **kwargs)

    engine.backend.model.generate = generate
    try:
        outcomes = {
            o.job_id: o for batch in engine.run([long_job, short_job], PLAN, GenerationParams(4)) for o in batch
        }
    finally:
        del engine.backend.model.generate
    assert outcomes[1].error is not None
    assert outcomes[1].error.startswith("generation failed (level 1, piece ")
    assert outcomes[1].error.endswith(": RuntimeError: device-side assert triggered")
    assert outcomes[2].error is None and outcomes[2].summary


def test_a_chat_request_runs_its_own_messages_and_limits(engine, short_job) -> None:
    request = {
        "messages": [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Name one colour."},
        ],
        "max_new_tokens": 5,
    }
    job = ClaimedJob(3, "chat-1", "Name one colour.", 1, request)
    calls = _record_generate(engine)
    try:
        outcomes = {o.job_id: o for batch in engine.run([job, short_job], PLAN, GenerationParams(12)) for o in batch}
    finally:
        del engine.backend.model.generate
    chat = outcomes[3]
    assert chat.error is None and chat.summary and chat.output_tokens <= 5
    assert chat.prompt_variant == "chat"
    chat_row = next(row for call in calls for row in call if len(row) == chat.prompt_tokens)
    text = engine.backend.tokenizer.decode(chat_row)
    assert "You answer in French." in text and "Summarize" not in text
    too_long = ClaimedJob(4, "chat-2", "x", 1, {"messages": [{"role": "user", "content": "word " * 3000}]})
    (failed,) = [o for batch in engine.run([too_long], PLAN, GenerationParams(4)) for o in batch]
    assert failed.error is not None and "over this model's usable context of 512 tokens" in failed.error
