"""LoRAs in the llama.cpp backend: a PEFT LoRA is converted, without torch, to llama.cpp's LoRA format
(names, rotary row order, alpha), computes what transformers computes with PEFT, applies to its own
calls only, and one llama.cpp cannot express is refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.model_names import resolve_model
from models.settings import Settings
from tests.conftest import SAMPLE
from tests.worker.test_llamacpp_soft_prompts import _write, adapter_batches
from worker.backends.base import AdapterSpec, Row
from worker.backends.peft_files import lora_tensors, rotary_order, write_lora_gguf

PREFIX = "base_model.model.model.layers"


def _peft_lora(folder: Path, tensors: dict[str, np.ndarray], **config: Any) -> Path:
    """A PEFT LoRA folder written by hand: adapter_config.json and float32 weights."""
    _write(folder, {name: ("F32", list(v.shape), v.astype("<f4").tobytes()) for name, v in tensors.items()})
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none", "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(settings | config))
    return folder


def test_a_peft_lora_becomes_a_llamacpp_lora_file(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    # 2 query heads and 1 key/value head of 4 dimensions, rank 2
    weights = {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": rng.normal(size=(2, 8)),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": np.arange(16.0).reshape(8, 2),
        f"{PREFIX}.0.self_attn.k_proj.lora_A.weight": rng.normal(size=(2, 8)),
        f"{PREFIX}.0.self_attn.k_proj.lora_B.weight": np.arange(8.0).reshape(4, 2),
        f"{PREFIX}.1.self_attn.v_proj.lora_A.weight": rng.normal(size=(2, 8)),
        f"{PREFIX}.1.self_attn.v_proj.lora_B.weight": np.arange(8.0).reshape(4, 2),
        f"{PREFIX}.1.mlp.down_proj.lora_A.weight": rng.normal(size=(2, 12)),
        f"{PREFIX}.1.mlp.down_proj.lora_B.weight": rng.normal(size=(8, 2)),
    }
    folder = _peft_lora(tmp_path / "a", weights)
    alpha, tensors = lora_tensors(folder, "a@1", heads=2, kv_heads=1)
    assert alpha == 4.0
    assert sorted(tensors) == sorted(
        f"blk.{name}.weight.lora_{side}" for name in ("0.attn_q", "0.attn_k", "1.attn_v", "1.ffn_down") for side in "ab"
    )
    # each head's two rotary halves interleaved: rows (0 1 2 3) of a head become (0 2 1 3)
    q = weights[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"]
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], q[[0, 2, 1, 3, 4, 6, 5, 7]])
    k = weights[f"{PREFIX}.0.self_attn.k_proj.lora_B.weight"]
    assert np.array_equal(tensors["blk.0.attn_k.weight.lora_b"], k[[0, 2, 1, 3]])
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_b"], weights[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"])
    assert np.allclose(tensors["blk.0.attn_q.weight.lora_a"], weights[f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"])
    assert np.array_equal(rotary_order(q, 1), q[[0, 4, 1, 5, 2, 6, 3, 7]])  # one head of 8: halves of 4

    path = tmp_path / "a.gguf"
    write_lora_gguf(path, "llama", alpha, tensors)
    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.fields[name].contents() for name in ("general.architecture", "general.type", "adapter.type")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora"}
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(4.0)
    read = {t.name: (tuple(int(n) for n in t.shape), np.asarray(t.data)) for t in reader.tensors}
    assert read["blk.0.attn_q.weight.lora_a"][0] == (8, 2)  # GGUF lists dimensions innermost first
    assert read["blk.0.attn_q.weight.lora_b"][0] == (2, 8)
    for name, values in tensors.items():
        assert np.array_equal(read[name][1].reshape(values.shape), values.astype(np.float32)), name

    # rsLoRA scales by alpha / sqrt(rank); llama.cpp by alpha / rank: the stored alpha makes them equal
    rs = _peft_lora(tmp_path / "rs", weights, r=2, lora_alpha=4, use_rslora=True)
    assert lora_tensors(rs, "rs@1", 2, 1)[0] / 2 == pytest.approx(4 / math.sqrt(2))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"config": {"use_dora": True}}, "cannot run this LoRA: DoRA (use_dora in"),
        ({"config": {"bias": "lora_only"}}, "trained biases (bias='lora_only')"),
        ({"config": {"modules_to_save": ["lm_head"]}}, "modules trained whole (['lm_head'])"),
        ({"config": {"rank_pattern": {"q_proj": 4}}}, "ranks or alphas per module"),
        ({"config": {"peft_type": "IA3"}}, "it is a IA3 adapter"),
        (
            {"extra": {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 8))}},
            "it adapts base_model.model.model.embed_tokens.lora_embedding_A; llama.cpp takes LoRAs of",
        ),
        ({"drop": "lora_B"}, "its LoRA of blk.0.attn_q.weight is not an A and a B of one rank ({'A': [2, 8]})"),
        ({"no_config": True}, "cannot read its LoRA configuration"),
    ],
)
def test_a_lora_llamacpp_cannot_run_gets_a_clear_error(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    weights = {
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": np.ones((2, 8)),
        f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": np.ones((8, 2)),
    }
    weights = {k: v for k, v in weights.items() if change.get("drop", "-") not in k} | change.get("extra", {})
    folder = _peft_lora(tmp_path / "bad", weights, **change.get("config", {}))
    if change.get("no_config"):
        (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter bad@1") as raised:
        lora_tensors(folder, "bad@1", heads=2, kv_heads=1)
    assert message in str(raised.value)


def _smollm2_lora(folder: Path, seed: int, scale: float = 0.03) -> AdapterSpec:
    """A random PEFT LoRA of rank 4 for SmolLM2-135M (30 layers of width 576, 3 key/value heads of 64),
    on every projection, written without torch."""
    rng = np.random.default_rng(seed)
    shapes = {
        "self_attn.q_proj": (576, 576),
        "self_attn.k_proj": (576, 192),
        "self_attn.v_proj": (576, 192),
        "self_attn.o_proj": (576, 576),
        "mlp.gate_proj": (576, 1536),
        "mlp.up_proj": (576, 1536),
        "mlp.down_proj": (1536, 576),
    }
    weights = {}
    for layer in range(30):
        for module, (inputs, outputs) in shapes.items():
            weights[f"{PREFIX}.{layer}.{module}.lora_A.weight"] = rng.normal(0, 1 / math.sqrt(inputs), (4, inputs))
            weights[f"{PREFIX}.{layer}.{module}.lora_B.weight"] = rng.normal(0, scale, (outputs, 4))
    targets = [m.split(".")[1] for m in shapes]
    _peft_lora(folder, weights, r=4, lora_alpha=8, target_modules=targets)
    return AdapterSpec(f"{folder.name}@1", "lora", str(folder))


def _prompts(backend: Any, count: int, tokens: int) -> list[list[int]]:
    """The first `count` sample articles as chat prompts of the one-sentence instruction, cut to `tokens`."""
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()[:count]]
    chats = [backend.tokenizer.chat([{"role": "user", "content": "Summarize in one sentence:\n\n" + t}]) for t in texts]
    return [backend.tokenizer.encode(str(chat))[:tokens] for chat in chats]


@pytest.mark.model
def test_a_lora_in_llamacpp_computes_what_transformers_computes_with_peft(tmp_path: Path) -> None:
    """The same LoRA, run by transformers with PEFT and by llama.cpp from its converted file (float32
    weights in both, de-quantized from the same GGUF): the next-token logits after each prompt agree
    (a wrong name, row order or scale would not), and they differ from the base model's by far more."""
    pytest.importorskip("llama_cpp")
    torch = pytest.importorskip("torch")
    from peft import PeftModel

    from worker import tuning
    from worker.backends.llamacpp import LlamaCppBackend

    spec = _smollm2_lora(tmp_path / "steer", seed=1)
    settings = Settings(cache_dir=str(tmp_path / "cache"), llamacpp_weights="f32", threads=2, dtype="float32")
    backend = LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
    prompts = _prompts(backend, 3, 120)
    seen: list[np.ndarray] = []
    sample = backend._sample

    def recording(index: int, temperature: float) -> int:  # the logits the backend samples from, kept
        pointer = backend.llama_cpp.llama_get_logits_ith(backend.ctx, index)
        seen.append(np.ctypeslib.as_array(pointer, shape=(backend.n_vocab,)).copy())
        return sample(index, temperature)

    backend._sample = recording  # type: ignore[method-assign]
    first = {}
    for adapter in (spec, None):
        seen.clear()
        backend.generate([Row(ids, 1, adapter=adapter) for ids in prompts])
        first[adapter is not None] = np.array(seen)
    backend._sample = sample  # type: ignore[method-assign]

    reference = tuning.load_base("smollm2", settings)
    model = PeftModel.from_pretrained(reference.model, spec.path).eval()
    with torch.no_grad():
        tuned = np.array([model(torch.tensor([ids])).logits[0, -1].float().numpy() for ids in prompts])
        with model.disable_adapter():
            base = np.array([model(torch.tensor([ids])).logits[0, -1].float().numpy() for ids in prompts])
    gap = np.abs(first[True] - tuned).max()
    moved = np.abs(tuned - base).max()
    print(f"llama.cpp vs transformers with the LoRA: max |diff| {gap:.4f}; the LoRA moved logits by {moved:.2f}")
    assert gap * 20 < moved
    assert np.abs(first[False] - base).max() * 20 < moved  # the plain model agrees too
    for a, b in zip(first[True], tuned, strict=True):
        assert np.corrcoef(a, b)[0, 1] > 0.999 and a.argmax() == b.argmax()


@pytest.mark.model
def test_a_lora_applies_to_its_own_calls_only(tmp_path: Path) -> None:
    """Calls with a LoRA, with another one, and without, in any order and streamed or not: each gives
    what it gives alone; a call mixing LoRAs is refused."""
    pytest.importorskip("llama_cpp")
    from worker.backends.llamacpp import LlamaCppBackend

    settings = Settings(cache_dir=str(tmp_path / "cache"), threads=2)
    backend = LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
    prompts = _prompts(backend, 2, 150)
    a, b = _smollm2_lora(tmp_path / "a", seed=2, scale=0.05), _smollm2_lora(tmp_path / "b", seed=3, scale=0.1)

    def run(adapter: AdapterSpec | None, streamed: bool = False) -> list[Any]:
        rows = [Row(ids, 12, adapter=adapter) for ids in prompts]
        if not streamed:
            return [g.tokens for g in backend.generate(rows)]
        done: dict[int, Any] = {}
        for finished in backend.generate_stream(rows):
            done.update(finished)
        return [done[n].tokens for n in range(len(rows))]

    plain = run(None)
    with_a, with_b = run(a), run(b)
    assert with_a != plain and with_b != plain and with_a != with_b
    assert run(None) == plain  # the LoRA is off again for calls without it
    assert run(a, streamed=True) == with_a and run(b) == with_b and run(None, streamed=True) == plain
    assert list(backend.loras) == ["a@1", "b@1"]
    with pytest.raises(ValueError, match="the rows of one call must share their LoRA adapter"):
        backend.generate([Row(prompts[0], 4, adapter=a), Row(prompts[1], 4, adapter=b)])
    with pytest.raises(ValueError, match="the rows of one call must share their LoRA adapter"):
        backend.generate([Row(prompts[0], 4, adapter=a), Row(prompts[1], 4)])


@pytest.mark.model
def test_a_llamacpp_worker_runs_a_batch_with_a_lora(
    fleet_settings: Settings, start_worker: Any, tmp_path: Path
) -> None:
    """A recorded LoRA, submitted with a batch, through a real llama.cpp worker on Redis and PostgreSQL:
    every row succeeds, says which adapter made it, and the LoRA changed the summaries."""
    pytest.importorskip("llama_cpp")
    settings = fleet_settings.model_copy(
        update={"engine": "llama.cpp", "max_new_tokens": 24, "adapter_dir": str(tmp_path / "adapters")}
    )
    _smollm2_lora(tmp_path / "adapters" / "voice" / "1", seed=4, scale=0.05)
    worker, summaries = adapter_batches(settings, start_worker, "voice", "lora", {"rank": 4})
    assert summaries["voice"] != summaries[None]
    assert "LoRA of 210 tensors loaded into llama.cpp" in worker.text()
