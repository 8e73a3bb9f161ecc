"""Finish reasons and trimming with the real default model (bundled SmolLM2-135M-Instruct): what
its backends say about each row, and `sumfleet run` with `--trim sentence` (the default) and `none`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from models.settings import Settings
from models.text import ends_sentence
from tests.conftest import SAMPLE, sumfleet
from worker.backends.base import Backend, Row
from worker.loading import load_engine
from worker.pipeline import GenerationPipeline

pytestmark = pytest.mark.model


@pytest.fixture(params=["transformers", "llama.cpp"], scope="module")
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (sumfleet[llamacpp])")
    engine = load_engine("smollm2", Settings(database_url="sqlite://", engine=request.param))
    assert isinstance(engine, GenerationPipeline)
    return engine.backend


def test_the_backend_says_why_each_row_stopped(backend: Backend) -> None:
    """Rows of one call with different limits: the ones cut by their limit say `length`, the one the
    model ends says `stop` (and holds an end-of-sequence token)."""
    tokenizer = backend.tokenizer
    yes = tokenizer.chat([{"role": "user", "content": "Is water wet? Answer with one word, yes or no."}])
    story = tokenizer.chat([{"role": "user", "content": "Tell me a long story about a ferry and an island."}])
    assert yes is not None and story is not None
    rows = [Row(tokenizer.encode(yes), 48), Row(tokenizer.encode(story), 5), Row(tokenizer.encode(yes), 1)]
    generated = backend.generate(rows)
    eos = set(tokenizer.eos_ids)
    assert [g.finish_reason for g in generated] == ["stop", "length", "length"]
    short = generated[0].tokens
    assert short is not None and any(token in eos for token in short) and len(short) < 48
    for g, row in zip(generated[1:], rows[1:], strict=True):
        assert g.tokens is not None and len(g.tokens) == row.max_new_tokens and not eos & set(g.tokens)


def test_sumfleet_run_trims_summaries_cut_by_the_limit(tmp_path: Path) -> None:
    corpus = tmp_path / "four.jsonl"
    corpus.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:4]))
    rows = {}
    for trim in ("sentence", "none"):
        out = tmp_path / f"{trim}.jsonl"
        settings = Settings(database_url=f"sqlite:///{tmp_path / f'{trim}.db'}")
        args = ["run", str(corpus), "-o", str(out), "--max-new-tokens", "40", "--no-progress"]
        done = sumfleet(*args, *(["--trim", "none"] if trim == "none" else []), settings=settings)
        assert done.returncode == 0, done.stderr.decode()
        rows[trim] = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["sentence"].keys() == rows["none"].keys()
    reasons = set()
    for doc_id, kept in rows["none"].items():
        trimmed = rows["sentence"][doc_id]
        assert kept["status"] == trimmed["status"] == "succeeded", (kept, trimmed)
        reasons.add(kept["finish_reason"])
        assert kept["finish_reason"] in ("stop", "length") and isinstance(kept["warnings"], list)
        if trimmed["finish_reason"] != kept["finish_reason"]:
            continue  # bf16 greedy near-ties may flip between two runs; nothing to compare
        if kept["finish_reason"] == "stop":
            assert trimmed["summary"] == kept["summary"]
            continue
        assert kept["output_tokens"] == 40
        assert kept["summary"].startswith(trimmed["summary"])  # trimming only cuts the end off
        assert ("truncated" in kept["warnings"]) is not ends_sentence(kept["summary"])
        if ends_sentence(trimmed["summary"]):
            assert "truncated" not in trimmed["warnings"] and len(trimmed["summary"]) <= len(kept["summary"])
        else:  # no complete sentence to cut back to: kept as it was, and flagged
            assert trimmed["summary"] == kept["summary"] and "truncated" in trimmed["warnings"]
    assert "length" in reasons  # 40 tokens cut at least one of the four summaries
    done = sumfleet(
        "results",
        json.loads(sumfleet("batches", "--json", settings=settings).stdout.decode().splitlines()[0])["id"],
        "-o",
        str(tmp_path / "none.csv"),
        settings=settings,
    )
    assert done.returncode == 0, done.stderr.decode()
    with (tmp_path / "none.csv").open(newline="") as handle:
        cells = {r["id"]: (r["finish_reason"], r["warnings"]) for r in csv.DictReader(handle)}
    assert cells == {i: (r["finish_reason"], ";".join(r["warnings"])) for i, r in rows["none"].items()}
