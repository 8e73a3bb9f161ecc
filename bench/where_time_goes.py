"""Where an engine's time goes: seconds per operation, reading prompts apart from decoding.

    python bench/where_time_goes.py --engine llama.cpp      # 24 BBC articles, 48 new tokens
    python bench/where_time_goes.py --engine transformers --docs 8

The engine runs as bench/engines.py runs it (`SUMFLEET_ENGINE=<engine>`, its defaults on this
machine, the one-sentence prompt, greedy), once to warm up, then once measured.

- llama.cpp: ggml calls back after each node of the compute graph (`cb_eval`), so each node's
  seconds are the time since the previous node finished. Nodes are named by llama.cpp's tensor
  name without its layer number (`ffn_up`, `Qcur`, ...) and ggml's operation (`MUL_MAT`,
  `FLASH_ATTN_EXT`, ...). A `llama_decode` call whose every token asks for logits and that holds at
  most one token per row is a decoding step; any other reads prompts. Asking for every node splits
  the graph into one computation per node, which costs a little: the attributed seconds are printed
  beside the run's own.
- transformers: torch's profiler, by aten operation (self time), over a run with 1 new token
  (prompts and one step) and over the full run; their difference is the decoding.

Printed with the machine's CPU flags, load average and matmul GFLOPS (bench/engines.py's), and
written to bench/results/where_time_goes-<engine>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engines import CORPUS, documents, machine, time_engine  # noqa: E402

LAYER_SUFFIX = re.compile(r"-\d+$")


def node_key(name: str, op: str) -> str:
    """A graph node's row in the table: its tensor name without the layer number, and its operation
    (ggml names unnamed nodes `node_<n>`: those go by their operation alone)."""
    if not name or name.startswith("node_"):
        return f"({op})"
    return f"{LAYER_SUFFIX.sub('', name)} ({op})"


def is_decoding_step(logits: list[bool], rows: int) -> bool:
    """A llama_decode call of one token per running row, each asking for logits."""
    return 0 < len(logits) <= rows and all(logits)


def table(seconds: dict[str, float], limit: int = 14) -> list[dict[str, Any]]:
    """The largest `limit` entries, with their share of the total."""
    total = sum(seconds.values()) or 1.0
    ranked = sorted(seconds.items(), key=lambda item: -item[1])[:limit]
    return [{"what": key, "seconds": round(value, 3), "share": round(value / total, 3)} for key, value in ranked]


def profile_llamacpp(docs: list[dict[str, str]], max_new: int) -> dict[str, Any]:
    import llama_cpp

    from models.settings import Settings
    from worker.loading import load_engine

    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_op_desc.restype = ctypes.c_char_p
    ggml.ggml_op_desc.argtypes = [ctypes.c_void_p]
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    phases: dict[str, dict[str, float]] = {"prompts": defaultdict(float), "decoding": defaultdict(float)}
    state: dict[str, Any] = {"phase": None, "last": 0.0}

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor: int, ask: bool, user_data: int) -> bool:
        if ask:
            return True  # every node: ggml computes up to it and calls back
        now = time.perf_counter()
        if state["phase"] is not None:
            name = (ggml.ggml_get_name(tensor) or b"").decode(errors="replace")
            op = (ggml.ggml_op_desc(tensor) or b"?").decode(errors="replace")
            phases[state["phase"]][node_key(name, op)] += now - state["last"]
        state["last"] = now
        return True

    made = llama_cpp.llama_context_default_params

    def with_callback() -> Any:
        params = made()
        params.cb_eval = observe
        return params

    llama_cpp.llama_context_default_params = with_callback
    engine: Any = load_engine("smollm2", Settings(database_url="sqlite://", engine="llama.cpp"))
    backend = engine.backend
    decode = backend._decode
    calls = {"prompts": [0, 0, 0.0], "decoding": [0, 0, 0.0]}  # calls, tokens, seconds

    def timed(batch: Any) -> None:
        logits = [bool(batch.logits[i]) for i in range(batch.n_tokens)]
        phase = "decoding" if is_decoding_step(logits, backend.shape[0]) else "prompts"
        state["phase"], state["last"] = phase, time.perf_counter()
        started = state["last"]
        try:
            decode(batch)
        finally:
            state["phase"] = None
            calls[phase][0] += 1
            calls[phase][1] += batch.n_tokens
            calls[phase][2] += time.perf_counter() - started

    time_engine(engine, docs[:4], 4)  # warm: contexts made, weights paged in
    for per_phase in phases.values():
        per_phase.clear()
    backend._decode = timed
    run = time_engine(engine, docs, max_new)
    return {
        "engine": "llama.cpp",
        "seconds": round(run["seconds"], 2),
        "docs_per_s": round(len(docs) / run["seconds"], 3),
        "weights": str(backend.path.name if backend.path else "?"),
        "flash_attention": backend.flash_attention,
        "phases": {
            phase: {
                "llama_decode_calls": calls[phase][0],
                "tokens": calls[phase][1],
                "seconds": round(calls[phase][2], 2),
                "attributed_seconds": round(sum(phases[phase].values()), 2),
                "by_node": table(phases[phase]),
            }
            for phase in phases
        },
    }


def profile_transformers(docs: list[dict[str, str]], max_new: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from models.settings import Settings
    from worker.loading import load_engine

    engine: Any = load_engine("smollm2", Settings(database_url="sqlite://", engine="transformers"))
    time_engine(engine, docs[:4], 4)
    runs: dict[int, tuple[float, dict[str, float]]] = {}
    for new in (1, max_new):
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            seconds = time_engine(engine, docs, new)["seconds"]
        ops = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
        runs[new] = (seconds, ops)
    (prompt_seconds, prompts), (all_seconds, everything) = runs[1], runs[max_new]
    decoding = {key: max(0.0, value - prompts.get(key, 0.0)) for key, value in everything.items()}
    return {
        "engine": "transformers",
        "seconds": round(all_seconds, 2),
        "docs_per_s": round(len(docs) / all_seconds, 3),
        "phases": {
            "prompts": {
                "seconds": round(prompt_seconds, 2),
                "note": "the run with 1 new token",
                "by_op": table(prompts),
            },
            "decoding": {
                "seconds": round(all_seconds - prompt_seconds, 2),
                "note": f"the run with {max_new} new tokens less the run with 1",
                "by_op": table(decoding),
            },
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("llama.cpp", "transformers"), required=True)
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not CORPUS.exists():
        print(f"skipping: {CORPUS} is not here (the shared corpora live beside the repository)", file=sys.stderr)
        return 0
    docs = documents(args.docs)
    profiler = profile_llamacpp if args.engine == "llama.cpp" else profile_transformers
    record = {"machine": machine(), "docs": len(docs), "max_new_tokens": args.max_new_tokens}
    record.update(profiler(docs, args.max_new_tokens))
    print(json.dumps(record["machine"]))
    print(f"{record['engine']}: {record['docs_per_s']} docs/s ({record['seconds']} s for {len(docs)} articles)")
    for phase, facts in record["phases"].items():
        rows = facts.get("by_node") or facts.get("by_op") or []
        head = ", ".join(f"{k} {v}" for k, v in facts.items() if k not in ("by_node", "by_op"))
        print(f"  {phase}: {head}")
        for row in rows:
            print(f"    {row['what']:<52} {row['seconds']:>8.3f} s  {100 * row['share']:5.1f}%")
    out = args.out or ROOT / "bench" / "results" / f"where_time_goes-{args.engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
