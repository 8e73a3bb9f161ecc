"""The CTranslate2 backend: a decoder-only model converted once to CTranslate2's format and run with its
int8 (or bf16, float32) kernels through `Generator.generate_batch`.

The source is a plain Hugging Face checkpoint: a model directory (or a Hub id in the local cache), or,
for a GGUF file, the complete float32 checkpoint `checkpoints.py` de-quantizes it into (written first
when it is not cached yet). The conversion is cached in `<cache dir>/ctranslate2/`, keyed by the
source's content, the compute type and CTranslate2's version, written to a temporary folder and renamed
into place; the tokenizer, chat template and end-of-sequence ids are saved with it, so a worker that
finds its conversion cached never imports torch (its tokenizer is the `tokenizers` library and a Jinja
template), which keeps its memory to the int8 weights and the KV cache.

A call's rows decode together. CTranslate2 reads the prompts in one pass only up to the shortest
one (the rest goes token by token), so a call is cut into groups of similar prompt lengths, run at
once on CTranslate2's worker thread. Each row stops at an end-of-sequence token or its own
`max_new_tokens` (a per-token callback ends it there; `max_length` is one value per call).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models import defaults
from models.errors import ConfigError
from models.model_names import ModelSource
from models.settings import Settings
from worker.backends.base import Generated, Row, Tokenizer, finish_reason
from worker.backends.cache import content_digest, default_cache_dir
from worker.backends.checkpoints import cache_key, cached_checkpoint

log = logging.getLogger(__name__)

MAX_BATCH_SIZE_CPU = 16  # rows decoded together on a CPU
# a call's rows are grouped so that prompt lengths in a group differ by at most this many tokens
# (CTranslate2 reads a group's prompts at once only up to the shortest one)
LENGTH_SPREAD = 32
# what a compute type CTranslate2 cannot run on the device becomes (and what `auto` means)
FALLBACK = {"int8_bfloat16": "int8_float32", "bfloat16": "float32", "int8": "int8_float32"}
COMPUTE_TYPES = ("int8", "int8_float32", "int8_bfloat16", "bfloat16", "float32")
AUTO_CPU = "int8_float32"  # measured fastest on CPUs at equal quality (README: Engines)
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_META = "sumfleet.json"  # what the backend needs beside CTranslate2's own files


class Ct2Tokenizer:
    """The model's `tokenizer.json` (the `tokenizers` library, as transformers runs it) and its chat
    template rendered the way transformers renders it, without importing torch or transformers."""

    def __init__(self, folder: Path, meta: Mapping[str, Any]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        self.eos_ids = list(meta["eos_ids"])
        self.specials = {key: value for key, value in meta["special_tokens"].items() if isinstance(value, str)}
        self.clean_up = bool(meta.get("clean_up_tokenization_spaces"))
        self.template = None
        if meta.get("chat_template"):
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            environment.globals["raise_exception"] = _raise_template_error
            self.template = environment.from_string(meta["chat_template"])

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        return list(self.rust.encode(text, add_special_tokens=special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        text = str(self.rust.decode(list(ids), skip_special_tokens=True))
        return _clean_up_spaces(text) if self.clean_up else text

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        if self.template is None:
            return None
        return str(self.template.render(messages=list(messages), add_generation_prompt=True, **self.specials))


def _raise_template_error(message: str) -> None:
    raise ValueError(f"the model's chat template refused the messages: {message}")


def _clean_up_spaces(text: str) -> str:
    """What transformers' `clean_up_tokenization` does to decoded text (spaces before punctuation)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for suffix in ("m", "s", "ve", "re"):
        text = text.replace(f" '{suffix}", f"'{suffix}")
    return text


class CTranslate2Backend:
    """One converted decoder-only model in a `ctranslate2.Generator`."""

    def __init__(self, generator: Any, folder: Path, settings: Settings, device: str, compute_type: str) -> None:
        self.generator = generator
        self.compute_type = compute_type
        meta = json.loads((folder / _META).read_text())
        self.tokenizer: Tokenizer = Ct2Tokenizer(folder, meta)
        self.eos_set = frozenset(meta["eos_ids"])
        self.end_token = sorted(self.eos_set)
        self.vocabulary: list[str] = json.loads((folder / "vocabulary.json").read_text())
        self.context_length: int | None = meta.get("context_length")
        on_gpu = device == "cuda"
        self.input_cap: int | None = None if on_gpu else defaults.MAX_INPUT_TOKENS_CPU
        self.encoder_decoder = False
        self.input_prefix = ""
        self.packs_itself = False
        self.adapter_methods: frozenset[str] = frozenset()
        self.max_batch_size = defaults.MAX_BATCH_SIZE_GPU if on_gpu else MAX_BATCH_SIZE_CPU
        self.token_budget = defaults.TOKEN_BUDGET_GPU if on_gpu else defaults.TOKEN_BUDGET_CPU
        self.length_spread = LENGTH_SPREAD

    @classmethod
    def load(cls, name: str, source: ModelSource, settings: Settings) -> CTranslate2Backend:
        ctranslate2 = _ctranslate2()
        device, index = _device(settings.device, ctranslate2.get_cuda_device_count())
        compute_type = pick_compute_type(settings.ct2_compute_type, device, ctranslate2.get_supported_compute_types)
        threads = settings.threads or len(os.sched_getaffinity(0))
        started = time.perf_counter()
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        # SUMFLEET_CACHE_CHECKPOINTS=0: convert into a temporary folder, removed once the model is in memory
        scratch = None if settings.cache_checkpoints else Path(tempfile.mkdtemp(prefix="sumfleet-ct2-"))
        folder, converted = converted_model(name, source, settings, scratch or cache_dir, compute_type)
        try:
            generator = ctranslate2.Generator(
                str(folder),
                device=device,
                device_index=index,
                compute_type=compute_type,
                inter_threads=1,
                intra_threads=threads if device == "cpu" else 0,
            )
            backend = cls(generator, folder, settings, device, compute_type)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        log.info(
            "loaded %s (CTranslate2 %s, %s, %s, %d threads) from %s in %.1fs",
            name,
            ctranslate2.__version__,
            compute_type,
            device,
            threads,
            "a new conversion" if converted else "the cached conversion",
            time.perf_counter() - started,
        )
        return backend

    def is_out_of_memory(self, error: BaseException) -> bool:
        if isinstance(error, MemoryError):  # std::bad_alloc
            return True
        text = str(error)
        return isinstance(error, RuntimeError) and any(
            sign in text for sign in ("failed to allocate", "out of memory", "ALLOC_FAILED")
        )

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        if any(row.adapter is not None for row in rows):
            raise ValueError("the CTranslate2 backend runs no adapters (SUMFLEET_ENGINE=transformers does)")
        started = time.perf_counter()
        order = sorted(range(len(rows)), key=lambda number: len(rows[number].ids))
        groups: list[list[int]] = []
        for number in order:
            if groups and len(rows[number].ids) - len(rows[groups[-1][0]].ids) <= self.length_spread:
                groups[-1].append(number)
            else:
                groups.append([number])
        # queued at once: CTranslate2 runs them one after the other on its own thread
        pending = [(group, self._submit([rows[number] for number in group])) for group in groups]
        outputs: list[list[int]] = [[] for _ in rows]
        try:
            for group, results in pending:
                for number, result in zip(group, results, strict=True):
                    tokens = list(result.result().sequences_ids[0])
                    outputs[number] = tokens[: rows[number].max_new_tokens]
        except Exception:
            for _, results in pending:  # let the queued groups finish before the call is split and retried
                for result in results:
                    with contextlib.suppress(Exception):  # the first error is the one raised
                        result.result()
            raise
        seconds = time.perf_counter() - started
        return [
            Generated(tokens, seconds, finish_reason=finish_reason(tokens, row.max_new_tokens, self.eos_set))
            for row, tokens in zip(rows, outputs, strict=True)
        ]

    def _submit(self, rows: Sequence[Row]) -> list[Any]:
        """Queue one generate_batch call for `rows` (their results are futures)."""
        try:
            prompts = [[self.vocabulary[token] for token in row.ids] for row in rows]
        except IndexError:
            raise ValueError(f"a prompt holds a token id outside the model's {len(self.vocabulary)} tokens") from None
        limits = [row.max_new_tokens for row in rows]
        counts = [[0] for _ in rows]
        options: dict[str, Any] = {
            "max_length": max(limits),
            "include_prompt_in_result": False,
            "end_token": self.end_token,
            "return_end_token": True,
            "asynchronous": True,
        }
        if rows[0].temperature > 0:
            options |= {"sampling_topk": 0, "sampling_temperature": rows[0].temperature}
        else:
            options["sampling_topk"] = 1
        if len(set(limits)) > 1:

            def stop(step: Any) -> bool:
                """Each row ends at its own limit: called for every token a row generates."""
                count = counts[step.batch_id]
                count[0] += 1
                return count[0] >= limits[step.batch_id]

            options["callback"] = stop
        return list(self.generator.generate_batch(prompts, **options))


def _ctranslate2() -> Any:
    """The `ctranslate2` module (untyped, so imported by name), or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("ctranslate2")
    except ImportError:
        raise ConfigError(
            'SUMFLEET_ENGINE=ctranslate2 needs CTranslate2: pip install "sumfleet[ctranslate2]"'
        ) from None


def pick_compute_type(setting: str, device: str, supported: Any) -> str:
    """The compute type to convert to and run in: `auto` is int8 with float32 on CPUs (measured fastest
    at equal quality), bf16 on GPUs that have it; a type the device cannot run falls back (logged)."""
    if setting not in ("auto", *COMPUTE_TYPES):
        raise ConfigError(f"SUMFLEET_CT2_COMPUTE_TYPE={setting}: use auto or one of {', '.join(COMPUTE_TYPES)}")
    available = set(supported(device))
    wanted = setting
    if setting == "auto":
        wanted = AUTO_CPU if device == "cpu" else "bfloat16" if "bfloat16" in available else "float16"
    if wanted == "int8" and device == "cpu":
        return "int8_float32"  # the same kernels on a CPU: one cached conversion for both names
    choice = wanted
    while choice not in available and choice in FALLBACK:
        choice = FALLBACK[choice]
    if choice != wanted:
        log.warning("CTranslate2 cannot compute in %s on this %s; using %s", wanted, device, choice)
    return choice


def _device(setting: str, cuda_devices: int) -> tuple[str, int]:
    """(`cpu` or `cuda`, device index) from SUMFLEET_DEVICE."""
    if setting == "auto":
        return ("cuda", 0) if cuda_devices else ("cpu", 0)
    kind, _, number = setting.partition(":")
    if kind not in ("cpu", "cuda") or (number and not number.isdigit()):
        raise ConfigError(f"SUMFLEET_DEVICE={setting}: the CTranslate2 backend runs on cpu, cuda or cuda:N")
    if kind == "cuda" and int(number or 0) >= cuda_devices:
        raise ConfigError(f"SUMFLEET_DEVICE={setting}: CTranslate2 sees {cuda_devices} CUDA device(s)")
    return kind, int(number or 0)


# -- conversion ---------------------------------------------------------------------------------


def converted_model(
    name: str, source: ModelSource, settings: Settings, cache_dir: Path, compute_type: str
) -> tuple[Path, bool]:
    """The CTranslate2 conversion of `source` in `compute_type` under `cache_dir`, converted now if it is
    not there yet; and whether it was converted now."""
    ctranslate2 = _ctranslate2()
    if source.gguf_file:
        gguf_path = Path(source.location) / source.gguf_file
        source_key = cache_key(gguf_path, cache_dir, "float32")
        checkpoint = None
    else:
        checkpoint = _checkpoint_folder(name, source, settings)
        source_key = directory_key(checkpoint, cache_dir)
    folder = cache_dir / "ctranslate2" / f"{source_key}-{compute_type}-ct2{ctranslate2.__version__}"
    if (folder / _META).is_file() and (folder / "model.bin").is_file():
        return folder, False
    if checkpoint is None:
        checkpoint = _gguf_checkpoint(gguf_path, cache_dir, settings)
    convert(checkpoint, folder, compute_type)
    return folder, True


def directory_key(folder: Path, cache_dir: Path) -> str:
    """A model directory's name and the SHA-256 of its files' contents (each read once, remembered)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.name}:{content_digest(path, cache_dir)}\n".encode())
    return f"{folder.name}-{digest.hexdigest()[:16]}"


def _checkpoint_folder(name: str, source: ModelSource, settings: Settings) -> Path:
    """The local folder of a directory or Hub model (a Hub id: its snapshot in the local cache)."""
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source.location, local_files_only=not settings.allow_download))
    else:
        folder = Path(source.location)
    config = json.loads((folder / "config.json").read_text())
    if config.get("is_encoder_decoder"):
        raise ConfigError(
            f"the CTranslate2 backend runs decoder-only models here; model {name!r} is an encoder-decoder "
            "(use SUMFLEET_ENGINE=transformers)"
        )
    return folder


def _gguf_checkpoint(gguf_path: Path, cache_dir: Path, settings: Settings) -> Path:
    """The complete float32 checkpoint of a GGUF file (`checkpoints.py`), de-quantized now if not cached."""
    cached = cached_checkpoint(gguf_path, cache_dir, "float32")
    if cached is not None:
        return cached
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.backends.checkpoints import write_checkpoint
    from worker.backends.hf import _quiet_gguf_unpacking

    local = {"local_files_only": True, "gguf_file": gguf_path.name}
    with _quiet_gguf_unpacking():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **local)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **local)
    written = write_checkpoint(model, tokenizer, gguf_path, cache_dir, torch.float32)
    if written is None:
        raise ConfigError(f"could not write a plain checkpoint of {gguf_path.name} in {cache_dir} to convert")
    return written


def convert(checkpoint: Path, folder: Path, compute_type: str) -> None:
    """Convert a Hugging Face checkpoint to CTranslate2 in `compute_type` (weights quantized now), with the
    tokenizer, chat template and end ids; written to a temporary folder renamed into place."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    class Converter(importlib.import_module("ctranslate2.converters").TransformersConverter):  # type: ignore[misc]
        def load_tokenizer(self, tokenizer_class: Any, path: str, **kwargs: Any) -> Any:
            tokenizer = super().load_tokenizer(tokenizer_class, path, **kwargs)
            if tokenizer.bos_token is None:  # the converted config needs one; generating from prompts never reads it
                tokenizer.bos_token = tokenizer.eos_token or tokenizer.pad_token
            return tokenizer

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder.parent))
    try:
        Converter(str(checkpoint), low_cpu_mem_usage=True).convert(str(scratch), quantization=compute_type, force=True)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        tokenizer.save_pretrained(scratch / "tokenizer")
        (scratch / "tokenizer" / "tokenizer.json").replace(scratch / "tokenizer.json")
        shutil.rmtree(scratch / "tokenizer")
        config = json.loads((checkpoint / "config.json").read_text())
        (scratch / _META).write_text(json.dumps(_metadata(checkpoint, config, tokenizer), indent=1))
        try:
            scratch.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    log.info("converted %s to CTranslate2 (%s) in %.1fs", checkpoint.name, compute_type, time.perf_counter() - started)


def _metadata(checkpoint: Path, config: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """What the backend reads beside the converted weights: context, end ids, chat template, specials."""
    generation = checkpoint / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    if eos is None:
        eos = config.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    context = next((config[f] for f in _CONTEXT_FIELDS if isinstance(config.get(f), int) and config[f] > 0), None)
    template = getattr(tokenizer, "chat_template", None)
    return {
        "context_length": context,
        "eos_ids": sorted(eos_ids),
        "chat_template": template if isinstance(template, str) else None,
        "special_tokens": {
            key: getattr(tokenizer, key, None) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        },
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
    }
