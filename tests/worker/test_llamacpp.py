"""The llama.cpp backend beyond the shared pipeline tests: which engine `auto` picks, a worker
that never loads torch, and a real batch through Redis and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.model_names import ModelSource, resolve_model
from models.settings import Settings
from tests.conftest import ROOT, run_sample_through_a_worker
from worker import loading

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
    assert found["rss_mib"] < 512  # the GGUF stays quantized: well under half a GiB


@pytest.mark.model
@pytest.mark.services
def test_a_llamacpp_worker_runs_a_real_batch(fleet_settings: Settings, start_worker) -> None:
    pytest.importorskip("llama_cpp")
    settings = fleet_settings.model_copy(update={"engine": "llama.cpp", "max_new_tokens": 24})
    assert resolve_model("smollm2", settings).gguf_file
    _, worker = run_sample_through_a_worker(settings, start_worker, 120)
    assert "llama.cpp" in worker.text()  # the load line names the backend
