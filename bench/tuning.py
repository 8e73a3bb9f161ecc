"""The cost of tuning and of running a tuned adapter, on this CPU.

    python bench/tuning.py                  # 20 steps of each method, then 24 documents with and without adapters

Training: optimizer steps/s, examples/s and tokens/s of `worker.tuning.tune` on BBC articles
(batch 4, prompts cut to 256 tokens), for a soft prompt and for a LoRA. Generation: docs/s of
the engine on the first 24 articles without an adapter, with a soft prompt (its virtual tokens
add to every row), and with a LoRA, side by side in one process (interleaved twice); then, where
llama-cpp-python is installed, the llama.cpp backend on the same documents without an adapter, with
the same soft prompt and with the same LoRA (interleaved twice). Prints the CPU flags and load
average; writes bench/results/tuning.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.prompts import TEMPLATES, PromptPlan  # noqa: E402
from models.settings import Settings  # noqa: E402
from worker import tuning  # noqa: E402
from worker.backends.base import AdapterSpec  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "bbc_news.jsonl"


def rows(start: int, count: int) -> list[dict[str, str]]:
    found = []
    with CORPUS.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number >= start:
                found.append(json.loads(line))
            if len(found) == count:
                break
    return found


def llamacpp_generation(documents: list[str], plan: PromptPlan, adapters: dict[str, AdapterSpec]) -> dict[str, Any]:
    """docs/s of the llama.cpp backend's pipeline on `documents` without an adapter and with each of
    `adapters` (by method), and how many of each one's texts differ from the plain ones."""
    from models.claims import ClaimedJob
    from worker.engine import GenerationParams
    from worker.loading import load_engine

    engine = load_engine("smollm2", Settings(database_url="sqlite://", engine="llama.cpp"))
    jobs = [ClaimedJob(number, str(number), text, 1) for number, text in enumerate(documents)]
    specs: dict[str, AdapterSpec | None] = {"none": None, **adapters}
    runs: dict[str, list[float]] = {name: [] for name in specs}
    texts: dict[str, list[str | None]] = {}
    for _ in range(2):
        for name, spec in specs.items():
            started = time.perf_counter()
            outcomes = [o for batch in engine.run(jobs, plan, GenerationParams(48, adapter=spec)) for o in batch]
            if any(o.error for o in outcomes):
                raise RuntimeError(f"llama.cpp with adapter {name}: {next(o.error for o in outcomes if o.error)}")
            runs[name].append(round(len(documents) / (time.perf_counter() - started), 3))
            texts[name] = [o.summary for o in sorted(outcomes, key=lambda o: o.job_id)]
            print("llama.cpp", name, runs[name][-1], "docs/s", file=sys.stderr)
    unlike = {name: sum(a != b for a, b in zip(found, texts["none"], strict=True)) for name, found in texts.items()}
    return {name: {"docs_per_s": found, "texts_unlike_none": unlike[name]} for name, found in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tuning.json")
    args = parser.parse_args()
    if not CORPUS.exists():
        print(f"skipping: {CORPUS} is not here", file=sys.stderr)
        return 0
    flags = sorted(f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx512_bf16", "amx", "avx2")))
    record: dict[str, Any] = {"cpu_flags": sorted(set(flags)), "training": {}, "generation": {}}
    settings = Settings(database_url="sqlite://")
    plan = PromptPlan(TEMPLATES["one-sentence"])
    train = [tuning.Example(r["document"], r["summary"]) for r in rows(200, args.steps * 4)]
    scratch = Path(tempfile.mkdtemp())
    specs: dict[str, AdapterSpec | None] = {"none": None}
    for method in ("prompt-tuning", "lora"):
        backend = tuning.load_base("smollm2", settings)
        config = tuning.TuneConfig(method=method, batch_size=4, max_input_tokens=256, max_steps=args.steps)
        result = tuning.tune(backend, settings, train, plan, config, scratch / f"work-{method}", scratch / method)
        record["training"][method] = {
            "steps_per_s": round(result.steps / result.seconds, 3),
            "examples_per_s": round(result.steps * 4 / result.seconds, 2),
            "tokens_per_s": round(result.tokens / result.seconds),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        }
        print(method, json.dumps(record["training"][method]), file=sys.stderr)
        specs[method] = AdapterSpec(method, method, str(scratch / method), 20 if method == "prompt-tuning" else 0)
    backend = tuning.load_base("smollm2", settings)
    documents = [r["document"] for r in rows(0, args.docs)]
    runs: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(2):
        for name, spec in specs.items():
            started = time.perf_counter()
            tuning.summarize(backend, settings, "smollm2", plan, documents, 48, spec)
            runs[name].append(round(len(documents) / (time.perf_counter() - started), 3))
            print(name, runs[name][-1], "docs/s", file=sys.stderr)
    record["generation"] = {name: {"docs_per_s": found} for name, found in runs.items()}
    if importlib.util.find_spec("llama_cpp") is not None:
        tuned = {name: spec for name, spec in specs.items() if spec is not None}
        record["generation_llamacpp"] = llamacpp_generation(documents, plan, tuned)
    record["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
