"""Finish reasons, trimming and quality warnings on the worker side: the pipeline over a scripted
backend (each document says what the "model" answers), the lead engine, plugin engines, and the
chunk processor writing them to the database (SQLite here; PostgreSQL in tests/models/test_store.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from models.claims import ClaimedJob, JobOutcome
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from models.states import JobState
from models.store import iter_job_id_chunks
from producer.client import Client
from tests.worker.longdoc import long_document
from tests.worker.scripted_backend import ScriptedBackend, backwards
from tests.worker.toy_backend import ToyBackend
from worker.backends.base import finish_reason
from worker.chunk import ChunkProcessor
from worker.engine import GenerationParams
from worker.lead import LeadEngine
from worker.loading import load_engine
from worker.pipeline import GenerationPipeline

PLAN = PromptPlan(TEMPLATES["one-sentence"])
SCRIPTED = "python:tests.worker.scripted_backend:factory"
LIMIT = 16  # max_new_tokens of these tests

# what each document's "model" answers (ScriptedBackend), and its opening where that matters
SCRIPTS = {
    "stop": "The ferry runs again.",  # 5 tokens, then the end of the sequence
    "cut": "The council voted. It will run every hour from ten until two in the morning.",  # 17 tokens
    "no-sentence": "Councillors who voted for the plan on Tuesday said that the new electric boat runs hourly",
    "echo": "Summarize the following article in one sentence.",  # the instructions, back
    "copy": "The night ferry returns to the island villages after three long years.",  # the opening, back
    "loop": "the ferry the ferry the ferry the ferry.",
    "empty": "",
}
OPENINGS = {"copy": SCRIPTS["copy"]}

# (summary, finish_reason, warnings) per document, trimmed to a sentence (the default) and not
EXPECTED = {
    "sentence": {
        "stop": ("The ferry runs again.", "stop", []),
        "cut": ("The council voted.", "length", []),
        "no-sentence": (SCRIPTS["no-sentence"], "length", ["truncated"]),  # 16 tokens: the limit
        "echo": (SCRIPTS["echo"], "stop", ["echo"]),
        "copy": (SCRIPTS["copy"], "stop", ["echo"]),
        "loop": (SCRIPTS["loop"], "stop", ["repetition"]),
        "empty": (None, "stop", ["empty"]),
    },
}
EXPECTED["none"] = EXPECTED["sentence"] | {
    "cut": ("The council voted. It will run every hour from ten until two in the morning", "length", ["truncated"])
}


def documents() -> list[dict[str, str]]:
    return [
        {"id": name, "text": f"{OPENINGS.get(name, f'News of the day, part {name}.')} OUTPUT: {backwards(script)}"}
        for name, script in SCRIPTS.items()
    ]


def _jobs() -> list[ClaimedJob]:
    return [ClaimedJob(number, doc["id"], doc["text"], 1) for number, doc in enumerate(documents())]


def _run(engine: GenerationPipeline, jobs: Sequence[ClaimedJob], params: GenerationParams) -> dict[str, JobOutcome]:
    names = {job.id: job.doc_id for job in jobs}
    return {names[o.job_id]: o for batch in engine.run(jobs, PLAN, params) for o in batch}


def _pipeline(backend: ToyBackend | None = None, **settings: Any) -> GenerationPipeline:
    return GenerationPipeline("m", backend or ScriptedBackend(), Settings(database_url="sqlite://", **settings))


def test_finish_reason_from_the_tokens() -> None:
    assert finish_reason([5, 6, 1], 8, {1}) == "stop"  # ended by the model
    assert finish_reason([5, 6, 7, 1], 4, {1}) == "stop"  # the end-of-sequence token was its last allowed one
    assert finish_reason([5, 6, 7, 8], 4, {1}) == "length"  # ran into the limit
    assert finish_reason([5, 6, 7, 8, 9], 4, {1}) == "length"
    assert finish_reason([5, 6], 4, {1}) == "stop"  # stopped short of the limit (another stop criterion)
    assert finish_reason([], 4, {1}) == "stop"


@pytest.mark.parametrize("trim", ["sentence", "none"])
def test_the_pipeline_records_finish_reasons_trims_and_warns(trim: str) -> None:
    outcomes = _run(_pipeline(), _jobs(), GenerationParams(LIMIT, trim=trim))
    got = {name: (o.summary, o.finish_reason, o.warnings) for name, o in outcomes.items()}
    assert got == EXPECTED[trim]
    assert outcomes["empty"].error == "the model produced an empty summary"
    assert outcomes["cut"].output_tokens == LIMIT  # tokens generated, before trimming
    assert all(o.error is None for name, o in outcomes.items() if name != "empty")


def test_a_chat_request_is_returned_as_generated() -> None:
    """OpenAI-compatible requests get the completion itself (its finish_reason says it was cut)."""
    content = f"Summarize this. OUTPUT: {backwards(SCRIPTS['cut'])}"
    request = {"messages": [{"role": "user", "content": content}], "max_new_tokens": 8}
    chat = ClaimedJob(1, "req-1", content, 1, request)
    (outcome,) = _run(_pipeline(), [chat], GenerationParams(LIMIT, trim="sentence")).values()
    assert (outcome.summary, outcome.finish_reason) == ("The council voted. It will run every", "length")
    assert outcome.warnings == ["truncated"]


def test_a_map_reduced_document_has_its_final_summarys_finish_reason() -> None:
    # the toy backend answers with the second half of the prompt: the final prompt (the joined piece
    # summaries) is long enough to fill 8 tokens, and a short document's answer with 300 tokens is not
    pipeline = _pipeline(ToyBackend(), max_input_tokens=256)
    long, short = ClaimedJob(1, "report", long_document(600), 1), ClaimedJob(2, "short", "The ferry is back.", 1)
    outcomes = _run(pipeline, [long, short], GenerationParams(8))
    assert outcomes["report"].levels >= 2 and outcomes["report"].finish_reason == "length"
    assert outcomes["short"].finish_reason == "length"
    outcomes = _run(pipeline, [short], GenerationParams(200))
    assert outcomes["short"].finish_reason == "stop" and outcomes["short"].warnings is not None


def test_the_lead_engine_stops_by_itself() -> None:
    jobs = [ClaimedJob(1, "a", "One. Two. Three. Four.", 1), ClaimedJob(2, "b", "   ", 1)]
    outcomes = {o.job_id: o for batch in LeadEngine("lead", 3).run(jobs, PLAN, GenerationParams(2)) for o in batch}
    assert (outcomes[1].finish_reason, outcomes[1].warnings) == ("stop", [])  # never an echo: it copies by design
    assert (outcomes[2].error, outcomes[2].warnings) == ("no sentence found in the document", ["empty"])


# -- through the chunk processor, from a submitted batch ----------------------------------------


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[Client]:
    client = Client(sqlite_settings)
    yield client
    client.close()


def _process(client: Client, batch_id: str, engine: object) -> None:
    ids = [i for c in iter_job_id_chunks(client.sessions, batch_id, 1000, list(JobState)) for i in c]
    ChunkProcessor(client.sessions, engine, "w1").process(batch_id, ids)  # type: ignore[arg-type]


@pytest.mark.parametrize("trim", ["sentence", "none"])
def test_a_batchs_trim_option_reaches_the_worker_and_the_results(client: Client, trim: str) -> None:
    engine = load_engine(SCRIPTED, Settings(database_url="sqlite://"))
    assert isinstance(engine, GenerationPipeline) and isinstance(engine.backend, ScriptedBackend)
    sub = client.submit(documents(), model=SCRIPTED, max_new_tokens=LIMIT, trim=trim, publish=False)
    with client.sessions() as session:
        from models.store import get_batch

        assert get_batch(session, sub.batch_id).params["trim"] == trim
    _process(client, sub.batch_id, engine)
    rows = {r["id"]: r for r in client.results(sub.batch_id)}
    assert {name: (r["summary"], r["finish_reason"], r["warnings"]) for name, r in rows.items()} == EXPECTED[trim]
    assert rows["empty"]["status"] == "failed" and rows["stop"]["status"] == "succeeded"


def test_trim_is_checked_at_submit_and_defaults_to_the_setting(client: Client, sqlite_settings: Settings) -> None:
    from models.errors import InputError
    from models.store import get_batch

    with pytest.raises(InputError, match="--trim must be one of sentence, none, got 'words'"):
        client.submit(["The ferry is back."], model="lead", trim="words", publish=False)
    default = client.submit(["The ferry is back."], model="lead", publish=False)
    other = Client(sqlite_settings.model_copy(update={"trim": "none"}))
    try:
        kept = other.submit(["The ferry is back."], model="lead", publish=False)
        with client.sessions() as session:
            assert get_batch(session, default.batch_id).params["trim"] == "sentence"
            assert get_batch(session, kept.batch_id).params["trim"] == "none"
    finally:
        other.close()
    # a batch from before the option runs with the default
    assert GenerationParams.from_batch({"max_new_tokens": 8}).trim == "sentence"


class _QuietEngine:
    """A plugin engine that says nothing about finish reasons or warnings."""

    name = "quiet"

    def run(self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams) -> Iterator[list]:
        yield [JobOutcome(job.id, summary="no no no no no no" if n else "Fine.") for n, job in enumerate(jobs)]


def test_outputs_of_an_engine_that_does_not_check_them_get_the_text_checks(client: Client) -> None:
    sub = client.submit(["First.", "Second."], model="lead", publish=False)
    from sqlalchemy import update

    from models.tables import Batch

    with client.sessions.begin() as session:  # a batch for the plugin engine's model name
        session.execute(update(Batch).where(Batch.id == sub.batch_id).values(model="quiet"))
    _process(client, sub.batch_id, _QuietEngine())
    rows = list(client.results(sub.batch_id))
    assert [(r["finish_reason"], r["warnings"]) for r in rows] == [(None, []), (None, ["repetition"])]
