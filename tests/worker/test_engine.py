"""The transformers backend with the real bundled model: chat template, caching, decoding, continuous batching.

The pipeline behaviour every backend shares (packing, failures, out of memory, mixed limits,
map-reduce) is tested in test_pipeline.py, on this backend and on a toy one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from transformers import StaticCache

from models import defaults
from models.claims import ClaimedJob, JobOutcome
from models.model_names import resolve_model
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from tests.conftest import SAMPLE, transformers_engine
from worker.backends.cache import content_digest
from worker.backends.checkpoints import cache_key
from worker.engine import GenerationParams
from worker.hardware import cpu_flags

pytestmark = pytest.mark.model
TEMPLATE = PromptPlan(TEMPLATES["one-sentence"])


@pytest.fixture(scope="module")
def engine() -> Any:
    # float32: the comparisons below (batched vs alone, cached vs not) are about the code, and
    # bf16 rounding flips near-tied tokens more often than float32 does
    return transformers_engine("smollm2", Settings(database_url="sqlite://", dtype="float32", max_input_tokens=512))


@pytest.fixture(scope="module")
def jobs() -> list[ClaimedJob]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    return [ClaimedJob(i, r["id"], r["text"], 1) for i, r in enumerate(rows)]


def _raw(engine, ids: list[int]) -> str:
    """The text of `ids` with the special tokens (the chat template's markers) kept."""
    return engine.backend.tokenizer.hf.decode(ids)


def _run(engine, jobs, params: GenerationParams) -> dict[int, JobOutcome]:
    return {o.job_id: o for batch in engine.run(jobs, TEMPLATE, params) for o in batch}


def test_prompt_goes_through_the_chat_template(engine, jobs) -> None:
    variant, ids = engine.prompter.encode(TEMPLATE, jobs[0].text, 64)
    assert variant == "en"
    text = _raw(engine, ids)
    assert text.startswith("<|im_start|>system")
    assert "<|im_start|>user\nSummarize the following article in one sentence:\n\nThe city council" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_long_documents_are_cut_to_the_input_limit(engine) -> None:
    long_text = " ".join(f"Sentence number {i} is about the harbour." for i in range(400))
    _, ids = engine.prompter.encode(TEMPLATE, long_text, 64)
    assert len(ids) <= 512
    assert _raw(engine, ids).endswith("<|im_start|>assistant\n")  # the prompt's end survives


def test_batched_generation_matches_one_at_a_time(engine, jobs) -> None:
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


def test_cpu_calls_decode_into_a_static_kv_cache_with_the_same_tokens(engine, jobs) -> None:
    """On the CPU a call decodes into a KV cache allocated once (transformers' static cache), not the
    dynamic one that concatenates every layer's keys and values at each step; in float32 the tokens
    are the same either way."""
    backend = engine.backend
    caches: list[str | None] = []
    real = backend.model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        given = kwargs.get("cache", kwargs.get("past_key_values"))  # filled by the prompts' sub-batches
        caches.append("static" if isinstance(given, StaticCache) else kwargs["generation_config"].cache_implementation)
        return real(*args, **kwargs)

    backend.model.generate = generate
    params = GenerationParams(max_new_tokens=12)
    try:
        static = _run(engine, jobs[:4], params)
        backend.static_cache, prefill = False, backend.prefill_tokens
        backend.prefill_tokens = 0
        dynamic = _run(engine, jobs[:4], params)
    finally:
        backend.static_cache, backend.prefill_tokens = True, prefill
        del backend.model.generate
    assert caches == ["static", None]  # one call each: the four documents share it
    assert {i: o.summary for i, o in static.items()} == {i: o.summary for i, o in dynamic.items()}
    assert all(o.error is None and o.summary for o in static.values())


def test_prompts_read_in_sub_batches_of_like_lengths_give_the_same_tokens(engine, jobs, monkeypatch) -> None:
    """A call's prompts are read into its static cache in groups of rows of about the same length,
    each padded to its own longest row only; then the rows decode together. In float32 the tokens
    are those of reading all prompts at once, padded to the longest."""
    from worker.backends import hf

    backend = engine.backend
    assert backend.prefill_tokens == defaults.PREFILL_TOKENS_CPU
    groups: list[list[int]] = []
    real = hf._prefill_groups

    def recorded(lengths: list[int], budget: int) -> list[list[int]]:
        groups.extend(found := real(lengths, budget))
        return found

    monkeypatch.setattr(hf, "_prefill_groups", recorded)
    params = GenerationParams(max_new_tokens=12)
    prefill = backend.prefill_tokens
    try:
        backend.prefill_tokens = 400  # a few rows per group: the sample's prompts are 95-190 tokens
        grouped = _run(engine, jobs, params)
        backend.prefill_tokens = 0
        whole = _run(engine, jobs, params)
    finally:
        backend.prefill_tokens = prefill
    assert len(groups) > 2 and sorted(i for group in groups for i in group) == list(range(len(jobs)))
    assert {i: o.summary for i, o in grouped.items()} == {i: o.summary for i, o in whole.items()}
    assert all(o.error is None and o.summary for o in grouped.values())
    assert [o.prompt_tokens for o in grouped.values()] == [o.prompt_tokens for o in whole.values()]


def test_prefill_groups_hold_rows_of_like_lengths_within_the_budget() -> None:
    from worker.backends.hf import _prefill_groups

    lengths = [300, 10, 0, 120, 11, 2000, 130, 12]
    groups = _prefill_groups(lengths, 400)
    assert groups == [[1, 4, 7], [3, 6], [0], [5]]  # shortest first; the 0-token row has nothing to read
    assert all(len(g) * max(lengths[i] for i in g) <= 400 or len(g) == 1 for g in groups)
    assert _prefill_groups([5, 5, 5], 10_000) == [[0, 1, 2]]


def test_continuous_batching_gives_the_same_summaries(engine, jobs) -> None:
    # two rows of different lengths, a few tokens: transformers' continuous batching is slow on a CPU
    # (its first call took 31 s for three short rows on 2 AVX2 cores); it is a GPU feature
    params = GenerationParams(max_new_tokens=5)
    static = _run(engine, jobs[:2], params)
    engine.backend.packs_itself = True  # what SUMFLEET_BATCHING=continuous sets at load
    try:
        continuous = _run(engine, jobs[:2], params)
    finally:
        engine.backend.packs_itself = False
    assert {i: o.summary for i, o in continuous.items()} == {i: o.summary for i, o in static.items()}


def test_gguf_model_is_cached_as_a_plain_checkpoint(tmp_path, engine, jobs) -> None:
    settings = Settings(database_url="sqlite://", dtype="float32", max_input_tokens=512, cache_dir=str(tmp_path))
    first = transformers_engine("smollm2", settings)
    (written,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert (written / "model.safetensors").is_file() and (written / "tokenizer.json").is_file()
    assert "float32" in written.name or "bfloat16" in written.name
    second = transformers_engine("smollm2", settings)
    config = second.backend.model.config
    assert config.quantization_config is None if hasattr(config, "quantization_config") else True
    params = GenerationParams(max_new_tokens=12)
    a = _run(first, jobs[:2], params)
    b = _run(second, jobs[:2], params)
    c = _run(engine, jobs[:2], params)
    assert (
        {i: o.summary for i, o in a.items()}
        == {i: o.summary for i, o in b.items()}
        == {i: o.summary for i, o in c.items()}
    )
    # the cached checkpoint is an ordinary local model directory: any such directory loads the same way
    local = transformers_engine(str(written), Settings(database_url="sqlite://", dtype="float32", max_input_tokens=512))
    assert local.name == str(written)
    assert {i: o.summary for i, o in _run(local, jobs[:2], params).items()} == {i: o.summary for i, o in a.items()}
    # a complete checkpoint: the tied output layer is stored as the input embedding (what vLLM reads)
    with safe_open(str(written / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads((written / "config.json").read_text())["tie_word_embeddings"] is True


def test_the_checkpoint_cache_is_keyed_by_content_not_file_time(tmp_path) -> None:
    """A reinstall (the same GGUF at a new path and time) reuses the cached checkpoint."""
    source = resolve_model("smollm2", Settings())
    gguf = Path(source.location) / str(source.gguf_file)
    copy = tmp_path / "reinstalled" / gguf.name
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    cache = tmp_path / "cache"
    assert content_digest(copy, cache) == content_digest(gguf, cache)
    assert cache_key(copy, cache, "torch.float32") == cache_key(gguf, cache, "torch.float32")
    os.utime(copy, (1, 1))  # touched: read again, same content, same key
    assert cache_key(copy, cache, "torch.float32") == cache_key(gguf, cache, "torch.float32")
    copy.write_bytes(copy.read_bytes()[:-1] + b"\0")  # another file: another key
    assert cache_key(copy, cache, "torch.float32") != cache_key(gguf, cache, "torch.float32")


def test_the_prompt_variant_follows_each_documents_language(engine, jobs) -> None:
    chinese = ClaimedJob(100, "zh-1", "今天上午，市政府宣布将在明年春天开通一条连接老港口和岛上村庄的夜间渡轮。", 1)
    plan = PromptPlan(TEMPLATES["one-sentence"])
    variant, ids = engine.prompter.encode(plan, chinese.text, 4)
    assert variant == "zh" and "请将以下文章简化为一句话：" in _raw(engine, ids)
    outcomes = _run_plan(engine, [jobs[0], chinese], plan, GenerationParams(max_new_tokens=4))
    assert (outcomes[jobs[0].id].prompt_variant, outcomes[100].prompt_variant) == ("en", "zh")
    fixed = PromptPlan(TEMPLATES["one-sentence"], language="en")
    assert engine.prompter.encode(fixed, chinese.text, 4)[0] == "en"


def test_a_character_split_by_the_length_limit_is_dropped(engine) -> None:
    tokenizer = engine.backend.tokenizer
    whole, split = tokenizer.encode("好的"), tokenizer.encode("鑫")
    assert len(split) > 1 and tokenizer.decode(split[:1]).endswith("\ufffd")  # a byte-level piece
    assert engine.prompter.decode(whole + split[:1]) == ("好的", len(whole) + 1)


def _run_plan(engine, jobs, plan, params):
    return {o.job_id: o for batch in engine.run(jobs, plan, params) for o in batch}


def test_bf16_weights_are_packed_for_generation_and_plain_for_training(jobs) -> None:
    """In bf16 on the CPU every linear layer keeps a copy of its weight in oneDNN's blocked layout for
    generation; with gradients on (tuning) the plain weights serve, so gradients still flow."""
    import torch

    from worker.backends.hf import unpack_linear_weights

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    engine = transformers_engine("smollm2", Settings(database_url="sqlite://", dtype="bfloat16", max_input_tokens=512))
    model = engine.backend.model
    linear = [m for m in model.modules() if type(m) is torch.nn.Linear]
    flags = cpu_flags()
    if not ({"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags):
        # oneDNN reorders bf16 weights only with AVX-512 BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only CPU has
        # neither): the backend then keeps every layer plain instead of failing
        assert engine.backend.packed_weights == 0
        assert all(getattr(m.forward, "__func__", None) is torch.nn.Linear.forward for m in linear)
        return
    assert engine.backend.packed_weights == len(linear) > 200  # 7 per decoder layer and the output layer
    layer = model.model.layers[0].mlp.up_proj
    inputs = torch.randn((5, layer.in_features), dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        packed = layer(inputs)
    plain = torch.nn.functional.linear(inputs, layer.weight)
    assert torch.allclose(packed.float(), plain.float(), atol=0.05, rtol=0.02)
    # with gradients on, the layer differentiates as a plain one
    wanting = inputs.clone().requires_grad_(True)
    layer(wanting).float().sum().backward()
    assert wanting.grad is not None and wanting.grad.abs().sum() > 0
    _, ids = engine.prompter.encode(TEMPLATE, jobs[0].text, 64)
    with torch.inference_mode():
        fast = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        unpack_linear_weights(model)
        assert layer.forward.__func__ is torch.nn.Linear.forward
        slow = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    assert fast.argmax() == slow.argmax() and (fast - slow).abs().max() < 0.5


def test_sub_batch_prefill_handles_one_and_two_token_prompts_and_mixed_limits(engine, jobs) -> None:
    """Edge rows of the prefilled path: a 1-token prompt has nothing to read before generate(), a
    2-token one a single token; rows of different limits share the call. Tokens as the plain path's."""
    from worker.backends.base import Row

    backend = engine.backend
    _, ids = engine.prompter.encode(TEMPLATE, jobs[2].text, 64)
    rows = [Row(ids[-1:], 6), Row(ids[-2:], 9), Row(ids, 12), Row(ids[:40], 3)]
    prefill = backend.prefill_tokens
    try:
        prefilled = backend.generate(rows)
        backend.prefill_tokens = 0
        plain = backend.generate(rows)
    finally:
        backend.prefill_tokens = prefill
    assert [g.tokens for g in prefilled] == [g.tokens for g in plain]
    assert [len(g.tokens or []) <= row.max_new_tokens for g, row in zip(prefilled, rows, strict=True)] == [True] * 4
    assert len(prefilled[2].tokens or []) > 3
    only_one = backend.generate([Row(ids[-1:], 4)])  # nothing at all to read first
    backend.prefill_tokens = 0
    try:
        assert only_one[0].tokens == backend.generate([Row(ids[-1:], 4)])[0].tokens
    finally:
        backend.prefill_tokens = prefill
