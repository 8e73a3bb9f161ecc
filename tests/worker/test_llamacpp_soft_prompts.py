"""Soft prompts (prompt tuning) in the llama.cpp backend: read from a PEFT adapter without torch, fed to
llama.cpp as input embeddings before a row's prompt, and equal in effect to the tokens they embed; a
soft prompt of another model, or a LoRA that cannot be read, gets a clear error (LoRAs:
test_llamacpp_lora.py)."""

from __future__ import annotations

import json
import struct
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.claims import ClaimedJob
from models.model_names import resolve_model
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from tests.conftest import SAMPLE, wait_for
from worker.backends.base import AdapterSpec, Row
from worker.engine import GenerationParams

INSTRUCTION = "You write very short summaries of news articles."


def _write(folder: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A safetensors file written by hand (name -> dtype, shape, little-endian bytes)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (kind, shape, raw) in tensors.items():
        header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    encoded = json.dumps(header).encode()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + b"".join(raw for _, _, raw in tensors.values())
    )
    return folder


def test_a_soft_prompt_is_read_in_each_float_type_without_torch(tmp_path: Path) -> None:
    from worker.backends.llamacpp import read_soft_prompt

    values = np.array([[1.5, -2.25, 0.0], [3.0, 0.125, -7.5]], dtype=np.float32)  # exact in f16 and bf16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    for kind, raw in (("F32", values.astype("<f4").tobytes()), ("F16", values.astype("<f2").tobytes()), ("BF16", bf16)):
        folder = _write(tmp_path / kind, {"prompt_embeddings": (kind, [2, 3], raw)})
        got = read_soft_prompt(folder, "a@1")
        assert got.dtype == np.float32 and got.shape == (2, 3) and np.array_equal(got, values), kind
    before = (values * 3).astype("<f4").tobytes()  # another tensor first: the soft prompt is read at its offset
    beside = {"other": ("F32", [2, 3], before), "prompt_embeddings": ("F32", [2, 3], values.astype("<f4").tobytes())}
    assert np.array_equal(read_soft_prompt(_write(tmp_path / "two", beside), "a@1"), values)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"base_model.lora_A.weight": ("F32", [2, 3], bytes(24))}, "adapter a@1 holds no soft prompt"),
        ({"prompt_embeddings": ("I64", [2, 3], bytes(48))}, "is I64 [2, 3], not a float matrix"),
        ({"prompt_embeddings": ("F32", [6], bytes(24))}, "is F32 [6], not a float matrix"),
        ({"prompt_embeddings": ("F32", [4, 3], bytes(24))}, "is cut short (6 values for a [4, 3] soft prompt)"),
    ],
)
def test_a_file_that_is_no_soft_prompt_gets_a_clear_error(tmp_path: Path, tensors: Any, message: str) -> None:
    from worker.backends.llamacpp import read_soft_prompt

    folder = _write(tmp_path / "adapter", tensors)
    with pytest.raises(ValueError, match="adapter a@1") as raised:
        read_soft_prompt(folder, "a@1")
    assert message in str(raised.value)
    with pytest.raises(ValueError, match=r"cannot read its soft prompt from .*nowhere"):
        read_soft_prompt(tmp_path / "nowhere", "a@1")


def _token_embeddings(path: Path) -> np.ndarray:
    """The token embedding table llama.cpp runs (from the GGUF file it loaded), as float32 rows."""
    gguf = pytest.importorskip("gguf")
    table = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    return np.asarray(gguf.quants.dequantize(table.data, table.tensor_type), dtype=np.float32)


def _soft_prompt(folder: Path, vectors: np.ndarray, ref: str) -> AdapterSpec:
    _write(folder, {"prompt_embeddings": ("F32", list(vectors.shape), vectors.astype("<f4").tobytes())})
    return AdapterSpec(ref, "prompt-tuning", str(folder), len(vectors))


@pytest.mark.model
def test_a_soft_prompt_runs_as_the_tokens_it_embeds(tmp_path: Path) -> None:
    """A soft prompt made of the embeddings of some tokens must generate what those tokens generate put
    before the prompt (float32 weights: other types round differently between calls of other shapes).
    Rows with different soft prompts and rows without one share calls, in one call and streamed, with
    the shared prompt prefix read once or not."""
    pytest.importorskip("llama_cpp")
    from worker.backends.llamacpp import LlamaCppBackend

    settings = Settings(cache_dir=str(tmp_path / "cache"), llamacpp_weights="f32", threads=2)
    backend = LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
    assert backend.path is not None
    table = _token_embeddings(backend.path)
    tokenizer = backend.tokenizer
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()[:3]]
    prompts = [
        tokenizer.encode(str(tokenizer.chat([{"role": "user", "content": "Summarize in one sentence:\n\n" + t}])))[:200]
        for t in texts
    ]
    first, second = tokenizer.encode(INSTRUCTION), tokenizer.encode("Be brief.")
    specs = [_soft_prompt(tmp_path / "a", table[first], "a@1"), _soft_prompt(tmp_path / "b", table[second], "b@1")]
    soft = [Row(prompts[0], 10, adapter=specs[0]), Row(prompts[1], 10, adapter=specs[1]), Row(prompts[2], 10)]
    spelled = [Row(first + prompts[0], 10), Row(second + prompts[1], 10), Row(prompts[2], 10)]
    expected = [g.tokens for g in backend.generate(spelled)]
    assert [g.tokens for g in backend.generate(soft)] == expected
    streamed: dict[int, Any] = {}
    for finished in backend.generate_stream(soft):
        streamed.update(finished)
    assert [streamed[n].tokens for n in range(3)] == expected
    # one soft prompt for all rows: it is read once with the prefix they share and copied to every stream
    same = [Row(ids, 10, adapter=specs[0]) for ids in prompts]
    shared_before = backend.prompt_tokens_shared
    together = [g.tokens for g in backend.generate(same)]
    assert backend.prompt_tokens_shared > shared_before
    assert together == [g.tokens for g in backend.generate([Row(first + ids, 10) for ids in prompts])]
    backend.share_prefix = False
    assert [g.tokens for g in backend.generate(same)] == together
    plain = [g.tokens for g in backend.generate([Row(ids, 10) for ids in prompts])]
    assert plain != together  # the soft prompt steers what is generated
    lora = Row(prompts[0], 4, adapter=AdapterSpec("l@1", "lora", str(tmp_path / "l")))
    for call in (backend.generate, lambda rows: list(backend.generate_stream(rows))):
        with pytest.raises(ValueError, match="the rows of one call must share their LoRA adapter"):
            call([soft[0], lora])  # llama.cpp applies a LoRA to a whole call


@pytest.mark.model
def test_a_llamacpp_engine_runs_soft_prompt_jobs_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from worker.loading import load_engine

    engine: Any = load_engine("smollm2", Settings(cache_dir=str(tmp_path / "cache"), engine="llama.cpp", threads=2))
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()[:3]]
    jobs = [ClaimedJob(n, f"d{n}", text, 1) for n, text in enumerate(texts)]
    plan = PromptPlan(TEMPLATES["one-sentence"])

    def run(adapter: AdapterSpec | None) -> list[Any]:
        done = {o.job_id: o for batch in engine.run(jobs, plan, GenerationParams(24, adapter=adapter)) for o in batch}
        return [done[n] for n in range(len(jobs))]

    backend = engine.backend
    assert backend.path is not None
    table = _token_embeddings(backend.path)
    tuned = _soft_prompt(tmp_path / "tuned", table[backend.tokenizer.encode(INSTRUCTION)], "tuned@1")
    steered, plain = run(tuned), run(None)
    assert all(o.error is None and o.summary for o in steered + plain)
    assert [o.summary for o in steered] != [o.summary for o in plain]
    (wrong,) = [t for t in [table[:5, :100]]]
    other = _soft_prompt(tmp_path / "other", wrong, "other@1")
    assert all(
        "adapter other@1: its soft prompt is 5 x 100; this model takes 5 x 576" in str(o.error) for o in run(other)
    )
    lora = AdapterSpec("lora@1", "lora", str(tmp_path / "lora"))  # recorded, but its folder is gone
    assert all("adapter lora@1: cannot read its LoRA configuration" in str(o.error) for o in run(lora))


@pytest.mark.model
def test_a_llamacpp_worker_runs_a_batch_with_a_soft_prompt(
    fleet_settings: Settings, start_worker: Any, tmp_path: Path
) -> None:
    """A recorded prompt-tuning adapter, submitted with a batch, through a real llama.cpp worker on Redis and
    PostgreSQL: every row succeeds, says which adapter made it, and the soft prompt changed the summaries."""
    pytest.importorskip("llama_cpp")
    settings = fleet_settings.model_copy(
        update={"engine": "llama.cpp", "max_new_tokens": 24, "adapter_dir": str(tmp_path / "adapters")}
    )
    source = resolve_model("smollm2", settings)
    table = _token_embeddings(Path(source.location) / str(source.gguf_file))  # the bundled Q4_1, de-quantized
    _soft_prompt(tmp_path / "adapters" / "steer" / "1", table[[504, 3210, 2115, 28, 30]], "steer@1")
    worker, summaries = adapter_batches(settings, start_worker, "steer", "prompt-tuning", {"virtual_tokens": 5})
    assert summaries["steer"] != summaries[None]
    assert "llama.cpp" in worker.text()


def adapter_batches(
    settings: Settings, start_worker: Any, name: str, method: str, params: dict[str, Any]
) -> tuple[Any, dict[str | None, list[str]]]:
    """Record adapter `name` version 1 (its files already under the adapter dir, at name/1), start a worker,
    and run the sample as a batch with the adapter and as one without: the worker and each batch's
    summaries in id order, once every row has succeeded and says which adapter made it."""
    from models.adapters import add_adapter
    from producer.client import Client

    client = Client(settings)
    client.ensure_schema()
    with client.sessions.begin() as session:
        add_adapter(
            session,
            name=name,
            version=1,
            base_model="smollm2",
            method=method,
            params=params,
            data_fingerprint="0" * 64,
            train_examples=0,
            scores=None,
            path=f"{name}/1",
        )
    worker = start_worker(settings, "smollm2")
    worker.wait_ready(300)
    summaries: dict[str | None, list[str]] = {}
    for adapter in (name, None):
        batch = client.submit_file(str(SAMPLE), model="smollm2", adapter=adapter).batch_id
        status = wait_for(partial(_done, client, batch), 300, "the batch", poll=0.5)
        assert status.counts == {"succeeded": 8}, worker.text()[-3000:]
        rows = list(client.results(batch))
        assert all(r["adapter"] == (adapter and f"{name}@1") and r["summary"] for r in rows), rows
        summaries[adapter] = [r["summary"] for r in sorted(rows, key=lambda r: r["id"])]
    return worker, summaries


def _done(client: Any, batch: str) -> Any:
    status = client.status(batch)
    return status if status.done else None
