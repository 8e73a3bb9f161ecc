"""The llama.cpp backend beyond the shared pipeline tests: which engine `auto` picks, the weight
type it runs (converted once, cached by content), a KV stream per row, a worker that never loads
torch, and a real batch through Redis and PostgreSQL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from models.model_names import ModelSource, resolve_model
from models.settings import Settings
from tests.conftest import ROOT, SAMPLE, run_sample_through_a_worker
from worker import loading
from worker.backends.base import Row

GGUF = ModelSource("gguf", "/models", "m.gguf")


@pytest.mark.parametrize(
    "fast_bf16, gpu, llama_installed, settings, expected",
    [
        (False, False, True, {}, "llama.cpp"),  # AVX2-only CPU: the quantized kernels win
        (False, False, False, {}, "transformers"),  # ... unless llama-cpp-python is not installed
        (True, False, True, {}, "transformers"),  # AVX-512 BF16 / AMX: torch in bf16 is faster
        (False, True, True, {}, "transformers"),  # a GPU
        (False, True, True, {"device": "cpu"}, "llama.cpp"),  # a GPU the operator does not want
        (False, False, True, {"dtype": "bfloat16"}, "transformers"),  # a dtype only torch runs
    ],
)
def test_auto_picks_the_engine_measured_fastest(
    monkeypatch: pytest.MonkeyPatch,
    fast_bf16: bool,
    gpu: bool,
    llama_installed: bool,
    settings: dict[str, str],
    expected: str,
) -> None:
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(loading, "nvidia_gpu_present", lambda: gpu)
    monkeypatch.setattr(loading, "installed", lambda module: llama_installed)
    assert loading.auto_engine(GGUF, Settings(**settings)) == expected  # type: ignore[arg-type]
    assert loading.auto_engine(ModelSource("directory", "/models/t5"), Settings()) == "transformers"
    assert loading.auto_engine(ModelSource("lead", ""), Settings()) == "lead"


def test_llamacpp_refuses_what_it_cannot_run(tmp_path) -> None:
    from models.errors import ConfigError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"SUMFLEET_ENGINE=llama\.cpp runs GGUF files; model .* is a directory"):
        loading.load_engine(str(tmp_path), Settings(engine="llama.cpp"))
    with pytest.raises(ConfigError, match="SUMFLEET_ENGINE=lead serves the lead models"):
        loading.load_engine("smollm2", Settings(engine="lead"))


LOAD_AND_RUN = """
import json, sys
from models.claims import ClaimedJob
from tests.conftest import peak_rss_mib
from models.prompts import TEMPLATES, PromptPlan
from models.settings import Settings
from worker.engine import GenerationParams
from worker.loading import load_engine
engine = load_engine("smollm2", Settings(database_url="sqlite://", engine="llama.cpp"))
job = ClaimedJob(1, "a", "The council voted to restore the night ferry. The service starts in May.", 1)
plan = PromptPlan(TEMPLATES["one-sentence"])
(outcome,) = [o for batch in engine.run([job], plan, GenerationParams(16)) for o in batch]
print(json.dumps({"summary": outcome.summary, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules,
                  "rss_mib": peak_rss_mib()}))
"""


@pytest.mark.model
def test_a_llamacpp_worker_never_loads_torch() -> None:
    pytest.importorskip("llama_cpp")
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["summary"] and not found["torch"] and not found["transformers"]
    assert found["rss_mib"] < 512  # the f16 weights (258 MB) and a KV stream per row: under half a GiB


@pytest.mark.model
@pytest.mark.services
def test_a_llamacpp_worker_runs_a_real_batch(fleet_settings: Settings, start_worker) -> None:
    pytest.importorskip("llama_cpp")
    settings = fleet_settings.model_copy(update={"engine": "llama.cpp", "max_new_tokens": 24})
    assert resolve_model("smollm2", settings).gguf_file
    _, worker = run_sample_through_a_worker(settings, start_worker, 120)
    assert "llama.cpp" in worker.text()  # the load line names the backend


@pytest.mark.parametrize(
    "choice, file_type, parameters, flags, machine, expected",
    [
        ("auto", 3, 135_000_000, {"avx2", "f16c"}, "x86_64", "f16"),  # Q4_1: no fast kernels, f16 has them
        ("auto", 3, 135_000_000, {"avx2", "f16c", "avx512_bf16"}, "x86_64", "bf16"),  # native bf16: faster yet
        ("auto", 3, 7_000_000_000, {"avx2", "f16c", "avx512_bf16"}, "x86_64", None),
        ("auto", 3, 135_000_000, set(), "aarch64", "f16"),
        ("auto", 3, 135_000_000, {"avx"}, "x86_64", None),  # no AVX2: nothing measured, the file as it is
        ("auto", 3, 7_000_000_000, {"avx2", "f16c"}, "x86_64", None),  # big: f16 would be 3.6x the bytes
        ("auto", 2, 135_000_000, {"avx2", "f16c"}, "x86_64", None),  # Q4_0 has fast kernels already
        ("auto", 7, 135_000_000, {"avx2", "f16c"}, "x86_64", None),  # Q8_0 too
        ("as-is", 3, 135_000_000, {"avx2", "f16c"}, "x86_64", None),
        ("q8_0", 3, 135_000_000, set(), "x86_64", "q8_0"),  # asked for: converted whatever the CPU
        ("q8_0", 7, 135_000_000, set(), "x86_64", None),  # already that type
        ("f16", 1, 135_000_000, set(), "x86_64", None),
    ],
)
def test_the_weight_type_run(
    monkeypatch: pytest.MonkeyPatch,
    choice: str,
    file_type: int,
    parameters: int,
    flags: set[str],
    machine: str,
    expected: str | None,
) -> None:
    from worker.backends import llamacpp

    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: flags)
    monkeypatch.setattr(llamacpp.platform, "machine", lambda: machine)
    # the CPU's flags decide here: llama.cpp built for the machine (scripts/install.sh) has what the CPU has
    monkeypatch.setattr(llamacpp, "bf16_kernels", lambda: "avx512_bf16" in flags)
    assert llamacpp.weight_type(choice, file_type, parameters) == expected


@pytest.mark.parametrize(
    "choice, file_type, expected",
    [
        ("auto", 3, None),  # Q4_1 runs as it is: the AMX kernels multiply it (no f16 conversion)
        ("auto", 7, None),
        ("auto", 1, None),  # an f16 file: as it is, AMX or not
        ("q8_0", 3, "q8_0"),  # asked for: converted all the same
        ("f16", 3, "f16"),
    ],
)
def test_the_weight_type_run_where_the_amx_kernels_are_sound(
    monkeypatch: pytest.MonkeyPatch, choice: str, file_type: int, expected: str | None
) -> None:
    from worker.backends import llamacpp

    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: {"avx2", "f16c", "amx_int8"})
    monkeypatch.setattr(llamacpp, "bf16_kernels", lambda: False)
    assert llamacpp.weight_type(choice, file_type, 135_000_000, amx=True) == expected
    if choice == "auto" and file_type == 3:  # without them, f16 (tinyBLAS) is the faster
        assert llamacpp.weight_type(choice, file_type, 135_000_000, amx=False) == "f16"


FAULTS = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"  # dies as a faulty AMX kernel did
RUNS = "print('sound')\n"


def test_the_amx_verdict_comes_from_a_child_process_and_is_kept_per_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A build whose AMX kernels kill the process is found out in a child process (the worker lives
    on), the verdict is kept on disk by the library's content, and another build is tried afresh."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (sumfleet[llamacpp])")
    from worker.backends import llamacpp

    library = tmp_path / "libggml-cpu.so"
    library.write_bytes(b"one build")
    monkeypatch.setattr(llamacpp, "ggml_cpu_library", lambda: library)
    monkeypatch.setattr(llamacpp, "_amx_verdicts", {})
    settings = Settings(cache_dir=str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"

    monkeypatch.setattr(llamacpp, "AMX_PROBE", FAULTS)
    assert llamacpp.amx_sound(model, settings) is False
    markers = list((tmp_path / "cache" / "llamacpp").iterdir())
    assert len(markers) == 1 and markers[0].read_text().startswith("faulty: exit status -11")

    monkeypatch.setattr(llamacpp, "AMX_PROBE", RUNS)  # the same build: not run again, in memory or on disk
    assert llamacpp.amx_sound(model, settings) is False
    monkeypatch.setattr(llamacpp, "_amx_verdicts", {})
    assert llamacpp.amx_sound(model, settings) is False

    library.write_bytes(b"another build")  # rebuilt (scripts/install.sh's flags): tried again
    assert llamacpp.amx_sound(model, settings) is True
    assert sorted(m.read_text() for m in (tmp_path / "cache" / "llamacpp").iterdir()) == [
        "faulty: exit status -11\n",
        "sound\n",
    ]


def test_the_weight_setting_names_what_it_takes() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="llamacpp_weights"):
        Settings(llamacpp_weights="q4_1")


def _gguf_type(path: Path) -> int:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return int(llm.metadata["general.file_type"])
    finally:
        llm.close()


def test_amx_buffers_are_kept_out_where_the_build_has_them() -> None:
    """llama.cpp's AMX matrix product faulted and killed the process on a Sapphire Rapids machine
    (README: Engines): a model the backend loads keeps its weights out of the extra buffer types
    when the build has AMX kernels, and only while it loads."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (sumfleet[llamacpp])")
    import llama_cpp.llama_cpp as native

    from worker.backends.llamacpp import amx_built, without_amx_buffers

    assert native.llama_model_default_params().use_extra_bufts
    with without_amx_buffers():
        assert native.llama_model_default_params().use_extra_bufts is not amx_built()
    assert native.llama_model_default_params().use_extra_bufts


def _scores(path: Path, text: str, amx: bool) -> Any:
    """llama.cpp's logits at every position of `text`'s first 200 tokens, its AMX kernels on or off."""
    import contextlib

    import llama_cpp
    import numpy as np

    from worker.backends.llamacpp import without_amx_buffers

    with contextlib.nullcontext() if amx else without_amx_buffers():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=256, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode())[:200]
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


LOADS = """
import json, sys
from pathlib import Path
from models.model_names import resolve_model
from models.settings import Settings
from worker.backends.llamacpp import LlamaCppBackend

settings = Settings(engine="llama.cpp", cache_dir=sys.argv[1])
backend = LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
print(json.dumps({"amx": backend.amx, "file_type": int(backend.llm.metadata["general.file_type"]),
                  "converted": (Path(sys.argv[1]) / "gguf").exists()}))
"""


def _child(script: str, *args: str) -> str:
    """`script` in a new Python process (no torch in it unless it loads torch): its standard output."""
    child = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout


@pytest.mark.model
def test_where_the_amx_kernels_are_sound_the_file_runs_on_them_as_it_is(tmp_path: Path) -> None:
    """On a CPU with AMX, a build from scripts/install.sh runs the bundled Q4_1 file as it is on
    llama.cpp's AMX kernels (1.8x f16 on the plain ones: README), and they compute what the plain
    kernels do: the same logits to rounding. Without AMX kernels the backend keeps them off. (The
    backend loads in a process of its own: in one that has loaded torch it keeps them off.)"""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (sumfleet[llamacpp])")
    import numpy as np

    from worker.backends.llamacpp import Q4_1, amx_built

    loaded = json.loads(_child(LOADS, str(tmp_path / "cache")).splitlines()[-1])
    if not amx_built():
        assert loaded["amx"] is False
        pytest.skip("this llama.cpp has no AMX kernels (a CPU without AMX)")
    assert loaded["amx"], "llama.cpp's AMX kernels fault in this build (scripts/install.sh builds it with -fno-dse)"
    assert loaded["file_type"] == Q4_1 and not loaded["converted"]  # not converted to f16
    assert (tmp_path / "cache" / "llamacpp").is_dir()

    source = resolve_model("smollm2", Settings())
    path = Path(source.location) / str(source.gguf_file)
    text = json.loads(SAMPLE.read_text().splitlines()[0])["text"]
    # each on a new thread: this process may have run torch's AMX products on its main thread, which
    # release the tiles llama.cpp configured there (see the next test)
    with ThreadPoolExecutor(max_workers=1) as first, ThreadPoolExecutor(max_workers=1) as second:
        amx, plain = (
            first.submit(_scores, path, text, True).result(),
            second.submit(_scores, path, text, False).result(),
        )
    # measured: correlation at least 0.9990 at every position, the top token the same at 96.8% of them
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(amx, plain, strict=True)) > 0.995
    assert (amx.argmax(axis=1) == plain.argmax(axis=1)).mean() > 0.9


MIXED = """
import sys
from models.model_names import resolve_model
from models.settings import Settings
from worker.backends.base import Row
from worker.backends.llamacpp import LlamaCppBackend

settings = Settings(engine="llama.cpp", cache_dir=sys.argv[1])
backend = LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
rows = [Row(list(range(100, 180)), 4), Row(list(range(200, 290)), 4)]
before = [g.tokens for g in backend.generate(rows)]
print("amx", backend.amx)
import torch
weights = torch.randn(256, 256, dtype=torch.bfloat16)
print(float((weights @ weights).float().sum()))  # oneDNN's AMX product, on this (the main) thread
after = [g.tokens for g in backend.generate(rows)]
print("amx", backend.amx, "tokens", all(after), sum(a == b for a, b in zip(before, after)))
"""


@pytest.mark.model
def test_torch_products_between_llamacpp_calls_leave_it_working(tmp_path: Path) -> None:
    """In one process, a bf16 torch product between two calls of the backend on its AMX kernels: the
    second call died of an illegal instruction. Now the backend leaves the AMX kernels once torch is
    in the process, and the second call runs on the plain kernels (the same weights)."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (sumfleet[llamacpp])")
    from worker.backends.llamacpp import amx_built

    if not amx_built():
        pytest.skip("this llama.cpp has no AMX kernels (a CPU without AMX)")
    lines = _child(MIXED, str(tmp_path)).splitlines()
    assert lines[0] == "amx True"
    assert lines[-1].startswith("amx False tokens True")


@pytest.mark.model
def test_converted_weights_are_cached_by_content(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from worker.backends.llamacpp import converted_gguf

    source = resolve_model("smollm2", Settings())
    original = Path(source.location) / str(source.gguf_file)
    settings = Settings(cache_dir=str(tmp_path / "cache"))
    first = converted_gguf(original, "f16", settings)
    assert first.parent == tmp_path / "cache" / "gguf" and "-f16-embed-q8_0-" in first.name
    assert _gguf_type(first) == 1 and _gguf_type(original) == 3
    written = first.stat().st_mtime_ns
    copy = tmp_path / "elsewhere" / original.name  # the same bytes at another path (a reinstall)
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    assert converted_gguf(copy, "f16", settings) == first and first.stat().st_mtime_ns == written
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no half-written leftovers
    uncached = converted_gguf(original, "q8_0", Settings(cache_checkpoints=False))
    try:
        assert _gguf_type(uncached) == 7 and not uncached.is_relative_to(tmp_path / "cache")
    finally:
        shutil.rmtree(uncached.parent)


class _RecordingLlama:
    """llama_cpp as the backend calls it, recording on the way to the real calls what each context is made
    with (`context` of its parameters) and how many tokens each decode call carries."""

    def __init__(self, native: Any, context: Any, contexts: list[Any] | None = None) -> None:
        self.native = native
        self.context = context
        self.contexts: list[Any] = [] if contexts is None else contexts
        self.decoded: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.native, name)

    def llama_init_from_model(self, model: Any, params: Any) -> Any:
        self.contexts.append(self.context(params))
        return self.native.llama_init_from_model(model, params)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        self.decoded.append(batch.n_tokens)
        return int(self.native.llama_decode(ctx, batch))


def _small_backend(tmp_path: Path, budget: int) -> tuple[Any, list[str]]:
    """The bundled model in the llama.cpp backend with `budget` KV cells for at most 4 rows, and the sample's texts."""
    pytest.importorskip("llama_cpp")
    from worker.backends.llamacpp import LlamaCppBackend

    settings = Settings(cache_dir=str(tmp_path), token_budget=budget, max_batch_size=4, threads=2)
    backend = LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
    return backend, [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()]


@pytest.mark.parametrize("choice, expected", [("auto", None), ("on", True), ("off", False)])
def test_flash_attention_is_set_or_left_to_the_measurement(choice: str, expected: bool | None) -> None:
    """`auto` is not decided by CPU flags: the backend measures it at load (below)."""
    from pydantic import ValidationError

    from worker.backends import llamacpp

    assert llamacpp.flash_attention(choice) is expected
    with pytest.raises(ValidationError, match="llamacpp_flash_attention"):
        Settings(llamacpp_flash_attention="yes")


@pytest.mark.model
def test_auto_flash_attention_is_measured_on_this_machine_and_kept(tmp_path: Path) -> None:
    """SUMFLEET_LLAMACPP_FLASH_ATTENTION=auto: both ways timed on the loaded model, the faster kept (in the
    process and on disk, with the timings), and a later load takes the kept verdict without measuring."""
    pytest.importorskip("llama_cpp")
    from worker.backends import llamacpp

    settings = Settings(cache_dir=str(tmp_path), threads=1)
    source = resolve_model("smollm2", settings)
    llamacpp._flash_verdicts.clear()
    backend = llamacpp.LlamaCppBackend.load("smollm2", source, settings)
    (marker,) = (tmp_path / "llamacpp").glob("flash-attention-*")
    verdict, with_it, without = marker.read_text().split()
    assert float(with_it) > 0 and float(without) > 0
    assert verdict == ("on" if float(with_it) < float(without) else "off")
    assert backend.flash_attention is (verdict == "on")
    assert backend.ctx is None and backend.shape == (0, 0)  # the probe's contexts are gone
    # the kept verdict is what a new process reads (here: the opposite written in, which no measurement gives)
    marker.write_text(f"{'off' if verdict == 'on' else 'on'} 0 0\n")
    llamacpp._flash_verdicts.clear()
    again = llamacpp.LlamaCppBackend.load("smollm2", source, settings)
    assert again.flash_attention is (verdict != "on")
    assert again.generate([Row(again.tokenizer.encode("The ferry returns in May."), 3)])[0].tokens


@pytest.mark.model
def test_flash_attention_left_to_llamacpp_where_the_probe_does_not_fit(tmp_path: Path) -> None:
    """A token budget too small for the probe's four streams: llama.cpp's own choice, and the model runs."""
    pytest.importorskip("llama_cpp")
    from worker.backends import llamacpp

    settings = Settings(cache_dir=str(tmp_path), token_budget=512, threads=1)
    llamacpp._flash_verdicts.clear()
    backend = llamacpp.LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
    assert backend.flash_attention is None
    assert not list((tmp_path / "llamacpp").glob("flash-attention-*"))
    assert backend.generate([Row(backend.tokenizer.encode("The ferry returns in May."), 3)])[0].tokens


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.model
def test_the_attention_probe_times_a_call_of_summary_like_streams(tmp_path: Path, on: bool) -> None:
    """One probe call: every row decodes its tokens (an end-of-generation token does not stop it), in
    streams of 768 cells, as many as the budget holds; the context goes afterwards."""
    backend, _ = _small_backend(tmp_path, 4096)
    recording = backend.llama_cpp = _RecordingLlama(backend.llama_cpp, lambda params: (params.n_seq_max, params.n_ctx))
    made, decoded = recording.contexts, recording.decoded
    end = backend.end
    prompts = [
        backend.tokenizer.encode(f"Report {n}: the council voted to restore the night ferry. " * 6) for n in range(3)
    ]
    seconds = backend.time_attention(on, prompts, 5)
    assert 0 < seconds < 60
    assert made == [(4, 4 * 768)]  # 4,096 cells hold 5 streams of 768; _small_backend allows 4 rows
    assert sum(decoded) == sum(len(p) for p in prompts) + 3 * 4  # prompts, then 4 steps after the first token
    assert backend.flash_attention is on and backend.ctx is None and backend.shape == (0, 0)
    assert backend.end == end


@pytest.mark.model
def test_the_contexts_are_made_with_the_flash_attention_chosen(tmp_path: Path) -> None:
    """What the backend asks llama.cpp for (recorded on the way to the real call), and that both ways
    summarize alike: flash attention changes how attention is computed, not what."""
    from worker.backends.base import Row

    native = pytest.importorskip("llama_cpp")
    made: list[tuple[int, int]] = []

    outputs = {}
    for choice in ("off", "on"):
        backend, documents = _small_backend(tmp_path, 2048)
        backend.llama_cpp = _RecordingLlama(native, lambda params: (params.flash_attn_type, params.n_ubatch), made)
        backend.ctx = None  # the next call makes its context
        backend.flash_attention = {"off": False, "on": True}[choice]
        tokenizer = backend.tokenizer
        rows = [
            Row(tokenizer.encode(str(tokenizer.chat([{"role": "user", "content": "Summarize:\n\n" + d}]))), 6)
            for d in documents[:4]
        ]
        outputs[choice] = [g.tokens for g in backend.generate(rows)]
    assert made == [
        (native.LLAMA_FLASH_ATTN_TYPE_DISABLED, 256),
        (native.LLAMA_FLASH_ATTN_TYPE_ENABLED, 512),
    ]
    same = sum(a[:3] == b[:3] for a, b in zip(outputs["off"], outputs["on"], strict=True))
    assert all(outputs["off"]) and same >= 3


@pytest.mark.model
def test_each_row_runs_in_a_kv_stream_of_its_own(tmp_path: Path) -> None:
    from worker.backends.base import Row
    from worker.backends.llamacpp import KVCacheFull

    backend, documents = _small_backend(tmp_path, 1536)
    tokenizer = backend.tokenizer

    def prompt(document: str, words: int) -> list[int]:
        chat = tokenizer.chat([{"role": "user", "content": "Summarize in one sentence:\n\n" + document}])
        ids = tokenizer.encode(str(chat))
        return ids[:words] if len(ids) > words else ids

    short = [prompt(d, 200) for d in documents[:3]]
    alone = [backend.generate([Row(ids, 8)])[0].tokens for ids in short]
    sequences, cells = backend.shape  # as many streams as the budget holds (at most 4 rows), each long enough
    assert sequences == 4 and cells >= max(len(ids) for ids in short) + 8
    together = backend.generate([Row(ids, 8) for ids in short])
    assert backend.shape == (sequences, cells)  # the same context served the call of three
    # a row attends over its own stream only: what shares its call does not change its tokens
    assert sum(g.tokens == a for g, a in zip(together, alone, strict=True)) >= 2
    longer = [prompt(" ".join(documents * 3), 600)] * 2
    assert all(len(ids) == 600 for ids in longer)
    backend.generate([Row(ids, 4) for ids in longer])
    assert backend.shape == (2, 768)  # remade: longer streams (in blocks of 256), as many as fit 1536 cells
    with pytest.raises(KVCacheFull, match="3 rows of up to 604 tokens need 2304 KV cells; the budget is 1536") as error:
        backend.generate([Row(ids, 4) for ids in longer * 2][:3])
    assert backend.is_out_of_memory(error.value)
    # what the pipeline packs fits: (longest prompt + new tokens, in blocks of 256) x rows within the budget
    assert backend.cell_alignment == 256
    backend.generate([Row(ids[:505], 7) for ids in longer * 2][:3])  # 3 x 512 = 1536
    assert backend.shape[0] == 3
    (alone_long,) = backend.generate([Row(prompt(" ".join(documents * 3), 1500), 2)])  # one row may pass the budget
    assert backend.shape == (1, 1536) and alone_long.tokens


@pytest.mark.model
def test_the_prompt_tokens_all_rows_start_with_are_read_once(tmp_path: Path) -> None:
    from worker.backends import llamacpp
    from worker.backends.base import Row

    backend, documents = _small_backend(tmp_path, 2048)
    tokenizer = backend.tokenizer
    documents = documents[:3]
    prompts = [
        tokenizer.encode(str(tokenizer.chat([{"role": "user", "content": "Summarize in one sentence:\n\n" + d}])))[:300]
        for d in documents
    ]
    prefix = 0
    while all(ids[prefix] == prompts[0][prefix] for ids in prompts):
        prefix += 1
    assert prefix >= llamacpp.MIN_SHARED_PREFIX  # the chat template's opening and the instruction
    alone = [backend.generate([Row(ids, 12)])[0].tokens for ids in prompts]
    assert backend.prompt_tokens_shared == 0  # one row: nothing to share
    together = backend.generate([Row(ids, 12) for ids in prompts])
    assert backend.prompt_tokens_shared == prefix * 2  # read in the first row's stream, copied into two others
    # the copied keys and values are the ones each row would have computed: the same tokens as alone
    # (one row of three may differ by rounding, as in any call of several rows)
    assert sum(g.tokens == a for g, a in zip(together, alone, strict=True)) >= 2
    # a row that is all prefix but its last token still reads that token (its first logits come from it)
    short = Row(prompts[0][: prefix + 1], 12)
    first, second = backend.generate([short, Row(prompts[1], 12)])
    assert backend.prompt_tokens_shared == prefix * 3
    assert first.tokens and second.tokens
    # rows that start differently share nothing
    backend.generate([Row(prompts[0], 4), Row(prompts[1][prefix:], 4)])
    assert backend.prompt_tokens_shared == prefix * 3


def _summary_prompts(backend: Any, documents: list[str], tokens: int) -> list[list[int]]:
    tokenizer = backend.tokenizer
    chats = [tokenizer.chat([{"role": "user", "content": "Summarize in one sentence:\n\n" + d}]) for d in documents]
    return [tokenizer.encode(str(chat))[:tokens] for chat in chats]


@pytest.mark.model
def test_rows_join_the_streams_as_others_finish(tmp_path: Path) -> None:
    from worker.backends.base import Row

    backend, documents = _small_backend(tmp_path, 768)  # 3 streams of 256 cells
    backend.max_batch_size = 3
    prompts = _summary_prompts(backend, documents[:6], 200)
    limits = [2, 12, 12, 3, 12, 5]
    rows = [Row(ids, limit) for ids, limit in zip(prompts, limits, strict=True)]
    alone = [backend.generate([row])[0].tokens for row in rows]
    order: list[list[int]] = []
    results = {}
    for finished in backend.generate_stream(rows):
        order.append([number for number, _ in finished])
        results.update(finished)
    assert backend.shape == (3, 256)
    assert sorted(results) == list(range(6)) and sum(map(len, order)) == 6  # each row once
    # row 3 took the stream row 0 left after 2 tokens and finished before rows 1 and 2 (12 tokens
    # each, started first): in calls of 3 it would have waited for them
    assert order[0] == [0] and order[1] == [3] and sorted(order[2]) == [1, 2]
    assert [len(results[n].tokens or []) for n in range(6)] == limits  # each row's own limit
    assert all(results[n].finish_reason == "length" for n in range(6))
    # a row moved into a freed stream (rows keep streams 0..n-1) goes on with its own keys and values:
    # the same tokens as alone (one may differ by a near-tie, as in any call of several rows)
    assert sum(results[n].tokens == alone[n] for n in range(6)) >= 5
    # a row that ends with an end-of-generation token leaves then, keeping it as its last, while a
    # longer one goes on
    question = backend.tokenizer.encode(
        str(backend.tokenizer.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}]))
    )
    answer = backend.generate([Row(question, 40)])[0]
    assert answer.finish_reason == "stop" and len(answer.tokens or []) < 40
    both = dict(pair for finished in backend.generate_stream([Row(question, 40), rows[1]]) for pair in finished)
    assert both[0].tokens == answer.tokens and both[0].finish_reason == "stop"
    assert both[0].tokens[-1] in backend.end and len(both[1].tokens or []) == 12


@pytest.mark.model
def test_rows_too_long_for_the_streams_wait_for_a_context_of_longer_ones(tmp_path: Path) -> None:
    from worker.backends.base import Row

    backend, documents = _small_backend(tmp_path, 1536)
    short = _summary_prompts(backend, documents[:3], 200)
    long = _summary_prompts(backend, [" ".join(documents * 3)], 600)[0]
    assert len(long) == 600
    rows = [Row(ids, 6) for ids in short] + [Row(long, 6)]
    results = {}
    order: list[int] = []
    for finished in backend.generate_stream(rows):
        order.extend(number for number, _ in finished)
        results.update(finished)
    assert order[-1] == 3  # after the short rows, in a context remade for it
    assert backend.shape == (2, 768)  # as many streams of 768 cells as the 1,536-cell budget holds
    assert all(len(results[n].tokens or []) == 6 for n in range(4))


@pytest.mark.model
def test_the_pipeline_hands_on_rows_as_they_finish_and_recovers_from_a_failed_stream(tmp_path: Path) -> None:
    from models.claims import ClaimedJob
    from models.prompts import TEMPLATES, PromptPlan
    from worker.engine import GenerationParams
    from worker.pipeline import GenerationPipeline

    backend, documents = _small_backend(tmp_path, 1024)
    assert backend.streams_rows  # SUMFLEET_BATCHING=auto: continuous for llama.cpp
    pipeline = GenerationPipeline("smollm2", backend, Settings(database_url="sqlite://", token_budget=1024))
    jobs = [ClaimedJob(i, f"d{i}", text, 1) for i, text in enumerate(documents[:6])]
    plan, params = PromptPlan(TEMPLATES["one-sentence"]), GenerationParams(max_new_tokens=10)
    calls: list[int] = []
    real = backend.generate

    def generate(rows: Any) -> Any:
        calls.append(len(rows))
        return real(rows)

    backend.generate = generate
    yields = [batch for batch in pipeline.run(jobs, plan, params) if batch]
    outcomes = {o.job_id: o for batch in yields for o in batch}
    assert sorted(outcomes) == list(range(6)) and all(o.summary and o.error is None for o in outcomes.values())
    assert len(yields) > 1 and calls == []  # handed on in steps, no packed calls
    # the stream fails after its first rows: the others go through packed calls, none lost or twice
    streaming = backend.generate_stream

    def failing(rows: Any) -> Any:
        stream = streaming(rows)
        yield next(stream)
        stream.close()
        raise RuntimeError("llama_decode failed with code -3")

    backend.generate_stream = failing
    again = [o for batch in pipeline.run(jobs, plan, params) for o in batch]
    assert sorted(o.job_id for o in again) == list(range(6))
    assert all(o.summary and o.error is None for o in again) and calls and sum(calls) < 6


@pytest.mark.model
def test_auto_runs_bf16_weights_where_llamacpp_multiplies_them_natively(tmp_path: Path) -> None:
    """The bundled Q4_1 file: bf16 weights where this CPU and this llama.cpp build have AVX-512 BF16, else
    f16 (on an x86 CPU with AVX2 and F16C); what runs is the converted file, and it summarizes."""
    pytest.importorskip("llama_cpp")
    from worker.backends import llamacpp

    if llamacpp.amx_built():
        pytest.skip("with AMX kernels the Q4_1 file may run as it is (tested above)")
    settings = Settings(cache_dir=str(tmp_path), threads=2, llamacpp_flash_attention="on")
    backend = llamacpp.LlamaCppBackend.load("smollm2", resolve_model("smollm2", settings), settings)
    expected = "bf16" if llamacpp.bf16_kernels() else "f16" if llamacpp.fast_f16_cpu() else None
    assert backend.path is not None
    if expected is None:
        assert backend.path.name.endswith("Q4_1.gguf")
    else:
        assert f"-{expected}-embed-q8_0-" in backend.path.name
        assert int(backend.llm.metadata["general.file_type"]) == llamacpp.FILE_TYPES[expected]
    (summary,) = backend.generate([Row(backend.tokenizer.encode("The ferry returns in May, the council said."), 4)])
    assert summary.tokens
