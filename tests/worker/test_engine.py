"""The transformers engine with the real bundled model: prompts, batching, error isolation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from models.settings import Settings
from models.store import ClaimedJob
from tests.conftest import SAMPLE
from worker.engines.base import GenerationParams
from worker.engines.loading import load_engine
from worker.prompts import TEMPLATES, PromptPlan

pytestmark = pytest.mark.model
TEMPLATE = PromptPlan(TEMPLATES["one-sentence"])


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    # float32: the comparisons below (batched vs alone, cached vs not) are about the code, and
    # bf16 rounding flips near-tied tokens more often than float32 does
    return load_engine("smollm2", Settings(database_url="sqlite://", dtype="float32", max_input_tokens=512))


@pytest.fixture(scope="module")
def jobs() -> list[ClaimedJob]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [ClaimedJob(i, r["id"], r["text"], 1) for i, r in enumerate(rows)]


def _run(engine, jobs, params: GenerationParams) -> dict[int, object]:  # type: ignore[no-untyped-def]
    return {o.job_id: o for batch in engine.run(jobs, TEMPLATE, params) for o in batch}


def test_prompt_goes_through_the_chat_template(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    variant, ids = engine.encode(TEMPLATE, jobs[0].text)
    assert variant == "en"
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system")
    assert "<|im_start|>user\nSummarize the following article in one sentence:\n\nThe city council" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_long_documents_are_cut_to_the_input_limit(engine) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(f"Sentence number {i} is about the harbour." for i in range(400))
    _, ids = engine.encode(TEMPLATE, long_text)
    assert len(ids) <= 512
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # the prompt's end survives


def test_batched_generation_matches_one_at_a_time(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    """Greedy decoding with left padding: the same summary alone or in a batch.

    Padding changes the shapes of the matmuls, so float rounding can in principle flip a
    near-tied token; the test allows at most one of the documents to differ, and only
    after a common prefix of several tokens.
    """
    params = GenerationParams(max_new_tokens=16)
    jobs = jobs[:5]
    batched = _run(engine, jobs, params)
    assert len(batched) == len(jobs)
    alone = {job.id: _run(engine, [job], params)[job.id] for job in jobs}
    differing = [i for i in batched if batched[i].summary != alone[i].summary]
    assert len(differing) <= 1, [(batched[i].summary, alone[i].summary) for i in differing]
    for i in differing:
        assert batched[i].summary.split()[:4] == alone[i].summary.split()[:4]
    for job in jobs:
        assert batched[job.id].prompt_tokens == alone[job.id].prompt_tokens
        assert batched[job.id].error is None and batched[job.id].output_tokens <= 16


def _failing_generate(engine, should_fail) -> Iterator[None]:  # type: ignore[no-untyped-def]
    real = engine.model.generate
    calls: list[int] = []

    def generate(*args, **kwargs):  # type: ignore[no-untyped-def]
        input_ids = kwargs["input_ids"]
        calls.append(input_ids.shape[0])
        error = should_fail(input_ids)
        if error is not None:
            raise error
        return real(*args, **kwargs)

    engine.model.generate = generate
    return calls


def test_one_failing_document_does_not_sink_its_batch(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    _, poison = engine.encode(TEMPLATE, jobs[2].text)
    poison_tensor = torch.tensor(poison)

    def should_fail(input_ids: torch.Tensor):  # type: ignore[no-untyped-def]
        for row in input_ids:
            if torch.equal(row[-len(poison):], poison_tensor):
                return RuntimeError("device-side assert triggered")
        return None

    calls = _failing_generate(engine, should_fail)
    try:
        outcomes = _run(engine, jobs[:4], GenerationParams(max_new_tokens=4))
    finally:
        del engine.model.generate
    assert outcomes[2].error == "generation failed: RuntimeError: device-side assert triggered"
    assert all(outcomes[i].summary and outcomes[i].error is None for i in (0, 1, 3))
    assert calls[0] == 4 and 1 in calls  # split down to the failing document


def test_out_of_memory_splits_the_batch(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    params = GenerationParams(max_new_tokens=4)
    expected = _run(engine, jobs[:4], params)
    calls = _failing_generate(
        engine, lambda ids: torch.OutOfMemoryError("CUDA out of memory") if ids.shape[0] > 2 else None
    )
    try:
        outcomes = _run(engine, jobs[:4], params)
    finally:
        del engine.model.generate
    assert calls == [4, 2, 2]
    assert {i: o.summary for i, o in outcomes.items()} == {i: o.summary for i, o in expected.items()}


def test_out_of_memory_lowers_the_budget_for_the_rest_of_the_chunk(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    settings = engine.settings
    engine.max_batch_size, engine.configured_budget = 4, 100_000
    calls = _failing_generate(
        engine, lambda ids: torch.OutOfMemoryError("out of memory") if ids.shape[0] > 2 else None
    )
    try:
        outcomes = _run(engine, jobs, GenerationParams(max_new_tokens=2))
        lowered = engine.budget
    finally:
        del engine.model.generate
        engine.max_batch_size = 8
        engine.configured_budget = engine.budget = settings.token_budget or 16384
    assert lowered < 100_000
    assert calls[:3] == [4, 2, 2]  # the first batch fails and is split
    assert max(calls[3:]) <= 2  # later batches are packed under the lowered budget: no more failures
    assert sum(calls[3:]) == 4  # the other four documents, each generated once
    assert all(o.error is None for o in outcomes.values()) and len(outcomes) == 8


def test_continuous_batching_gives_the_same_summaries(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    params = GenerationParams(max_new_tokens=8)
    static = _run(engine, jobs[:3], params)
    settings = engine.settings
    engine.settings = settings.model_copy(update={"batching": "continuous"})
    try:
        continuous = _run(engine, jobs[:3], params)
    finally:
        engine.settings = settings
    assert {i: o.summary for i, o in continuous.items()} == {i: o.summary for i, o in static.items()}


def test_gguf_model_is_cached_as_a_plain_checkpoint(tmp_path, engine, jobs) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(database_url="sqlite://", dtype="float32", max_input_tokens=512, cache_dir=str(tmp_path))
    first = load_engine("smollm2", settings)
    (written,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert (written / "model.safetensors").is_file() and (written / "tokenizer.json").is_file()
    assert "float32" in written.name or "bfloat16" in written.name
    second = load_engine("smollm2", settings)
    assert second.model.config.quantization_config is None if hasattr(second.model.config, "quantization_config") else True
    params = GenerationParams(max_new_tokens=12)
    a = _run(first, jobs[:2], params)
    b = _run(second, jobs[:2], params)
    c = _run(engine, jobs[:2], params)
    assert {i: o.summary for i, o in a.items()} == {i: o.summary for i, o in b.items()} == {i: o.summary for i, o in c.items()}
    # the cached checkpoint is an ordinary local model directory: any such directory loads the same way
    local = load_engine(str(written), Settings(database_url="sqlite://", dtype="float32", max_input_tokens=512))
    assert local.name == str(written)
    assert {i: o.summary for i, o in _run(local, jobs[:2], params).items()} == {i: o.summary for i, o in a.items()}


def test_the_prompt_variant_follows_each_documents_language(engine, jobs) -> None:  # type: ignore[no-untyped-def]
    chinese = ClaimedJob(100, "zh-1", "今天上午，市政府宣布将在明年春天开通一条连接老港口和岛上村庄的夜间渡轮。", 1)
    plan = PromptPlan(TEMPLATES["one-sentence"])
    variant, ids = engine.encode(plan, chinese.text)
    assert variant == "zh" and "请将以下文章简化为一句话：" in engine.tokenizer.decode(ids)
    outcomes = _run_plan(engine, [jobs[0], chinese], plan, GenerationParams(max_new_tokens=4))
    assert (outcomes[jobs[0].id].prompt_variant, outcomes[100].prompt_variant) == ("en", "zh")
    fixed = PromptPlan(TEMPLATES["one-sentence"], language="en")
    assert engine.encode(fixed, chinese.text)[0] == "en"


def test_a_character_split_by_the_length_limit_is_dropped(engine) -> None:  # type: ignore[no-untyped-def]
    whole = engine.tokenizer("好的", add_special_tokens=False)["input_ids"]
    split = engine.tokenizer("鑫", add_special_tokens=False)["input_ids"]
    assert len(split) > 1 and engine.tokenizer.decode(split[:1]).endswith("\ufffd")  # a byte-level piece
    assert engine._decode(whole + split[:1]) == ("好的", len(whole) + 1)


def _run_plan(engine, jobs, plan, params):  # type: ignore[no-untyped-def]
    return {o.job_id: o for batch in engine.run(jobs, plan, params) for o in batch}
