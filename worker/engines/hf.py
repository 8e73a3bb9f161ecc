"""The transformers engine: a causal LM, chat-templated prompts, length-packed batched `generate`."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from models import defaults
from models.settings import Settings
from models.store import ClaimedJob, JobOutcome
from worker.batching import batch_cost, take_batch
from worker.engines.cache import cached_checkpoint, default_cache_dir, write_checkpoint
from worker.engines.base import GenerationParams
from worker.engines.loading import ModelSource
from worker.prompts import PromptPlan

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX-512 BF16); Linux flags only."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA with bf16 and on CPUs with AMX/AVX-512 BF16, fp16 on older GPUs, else fp32.

    Measured on an AVX2-only CPU: bf16 generation ran 3.1x slower than fp32, so fp32 is
    the CPU default unless the CPU has native bf16.
    """
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def usable_context(config, settings: Settings, device: torch.device) -> int:  # type: ignore[no-untyped-def]
    """Prompt tokens a document may fill: the setting, else the model's own context less room
    for the summary, capped on a CPU (prefill time grows with it)."""
    if settings.max_input_tokens:
        return settings.max_input_tokens
    own = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            own = value
            break
    if own is None:
        return defaults.MAX_INPUT_TOKENS_FALLBACK
    own = max(64, own - settings.max_new_tokens)
    return min(own, defaults.MAX_INPUT_TOKENS_CPU) if device.type == "cpu" else own


@dataclass(slots=True)
class _Item:
    job: ClaimedJob
    ids: list[int]
    variant: str


class TransformersEngine:
    """One loaded causal LM. Documents are sorted by length and packed under a token budget."""

    def __init__(self, name: str, model, tokenizer, settings: Settings, device: torch.device) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        default_budget = defaults.TOKEN_BUDGET_GPU if device.type == "cuda" else defaults.TOKEN_BUDGET_CPU
        self.configured_budget = settings.token_budget or default_budget
        self.budget = self.configured_budget  # lowered for the rest of a chunk after out-of-memory
        default_size = defaults.MAX_BATCH_SIZE_GPU if device.type == "cuda" else defaults.MAX_BATCH_SIZE_CPU
        self.max_batch_size = settings.max_batch_size or default_size
        self.context = usable_context(model.config, settings, device)

    @classmethod
    def load(cls, name: str, source: ModelSource, settings: Settings) -> "TransformersEngine":
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        started = time.perf_counter()
        location, kwargs = source.location, {"local_files_only": not settings.allow_download}
        gguf_path = Path(source.location) / source.gguf_file if source.gguf_file else None
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        cached = cached_checkpoint(gguf_path, cache_dir, dtype) if gguf_path and settings.cache_checkpoints else None
        if cached is not None:
            location = str(cached)
        elif gguf_path is not None:
            kwargs["gguf_file"] = source.gguf_file
        with _quiet_gguf_unpacking():
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
        if gguf_path is not None and cached is None and settings.cache_checkpoints:
            write_checkpoint(model, tokenizer, gguf_path, cache_dir, dtype)
        model.to(device).eval()
        log.info(
            "loaded %s (%s) on %s from %s in %.1fs",
            name, dtype, device, "cached checkpoint" if cached else location, time.perf_counter() - started,
        )
        return cls(name, model, tokenizer, settings, device)

    # -- prompts ---------------------------------------------------------------------------

    def _prompt_text(self, prompt: PromptPlan, template: str, language: str, document: str) -> str:
        content = prompt.render(template, document, language)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content

    def encode(self, prompt: PromptPlan, document: str) -> tuple[str, list[int]]:
        """(variant, prompt token ids); an over-long document is cut to fit `max_input_tokens`."""
        variant, template, language = prompt.for_document(document)
        ids = self.tokenizer(self._prompt_text(prompt, template, language, document), add_special_tokens=False)["input_ids"]
        limit = self.context
        if len(ids) <= limit:
            return variant, ids
        doc_ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        keep = max(1, len(doc_ids) - (len(ids) - limit))
        cut = self.tokenizer.decode(doc_ids[:keep], skip_special_tokens=True)
        text = self._prompt_text(prompt, template, language, cut)
        return variant, self.tokenizer(text, add_special_tokens=False)["input_ids"][:limit]

    # -- generation ------------------------------------------------------------------------

    def run(self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams) -> Iterator[list[JobOutcome]]:
        items: list[_Item] = []
        failed: list[JobOutcome] = []
        for job in jobs:
            try:
                variant, ids = self.encode(prompt, job.text)
                items.append(_Item(job, ids, variant))
            except Exception as error:  # one bad document must not sink its chunk
                failed.append(JobOutcome(job.id, error=f"could not build the prompt: {_describe(error)}"))
        if failed:
            yield failed
        items.sort(key=lambda item: len(item.ids))
        if self.settings.batching == "continuous" and items:
            yield self._generate_safely(items, params)
            return
        self.budget = self.configured_budget
        lengths = [len(item.ids) for item in items]
        start = 0
        while start < len(items):  # packed one batch at a time, so a lowered budget applies at once
            end = take_batch(lengths, start, params.max_new_tokens, self.budget, self.max_batch_size)
            yield self._generate_safely(items[start:end], params)
            start = end

    def _generate_safely(self, items: list[_Item], params: GenerationParams) -> list[JobOutcome]:
        """Generate a batch; on any error split it in half, down to the failing document.

        Out of memory also lowers the token budget for the rest of the chunk.
        """
        try:
            if self.settings.batching == "continuous":
                return self._generate_continuous(items, params)
            return self._generate(items, params)
        except Exception as error:
            if isinstance(error, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                cost = batch_cost(max(len(i.ids) for i in items), params.max_new_tokens, len(items))
                self.budget = max(defaults.MIN_TOKEN_BUDGET, min(self.budget, cost // 2))
                log.warning("out of memory on %d documents; token budget now %d", len(items), self.budget)
            if len(items) == 1:
                log.warning("job %s failed: %s", items[0].job.id, _describe(error))
                return [JobOutcome(items[0].job.id, error=f"generation failed: {_describe(error)}")]
            half = len(items) // 2
            return self._generate_safely(items[:half], params) + self._generate_safely(items[half:], params)

    def _config(self, params: GenerationParams) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )

    def _outcome(self, item: _Item, tokens: list[int], elapsed: float) -> JobOutcome:
        cut = _until_eos(tokens, self.eos_ids)
        # a length cut can split a multi-byte character between tokens: drop the stray half
        summary = self.tokenizer.decode(cut, skip_special_tokens=True).rstrip("\ufffd").strip()
        return JobOutcome(
            item.job.id,
            summary=summary or None,
            error=None if summary else "the model produced an empty summary",
            prompt_tokens=len(item.ids),
            prompt_variant=item.variant,
            output_tokens=len(cut),
            generation_seconds=elapsed,
        )

    def _generate_continuous(self, items: list[_Item], params: GenerationParams) -> list[JobOutcome]:
        """transformers' continuous batching (paged attention; finished sequences leave, waiting ones join)."""
        started = time.perf_counter()
        with torch.inference_mode():
            results = self.model.generate_batch(
                inputs=[item.ids for item in items],
                generation_config=self._config(params),
                max_new_tokens=params.max_new_tokens,
            )
        elapsed = time.perf_counter() - started
        outputs = list(results.values())
        if len(outputs) != len(items):
            raise RuntimeError(f"continuous batching returned {len(outputs)} results for {len(items)} prompts")
        outcomes = []
        for item, output in zip(items, outputs):
            if output.error:
                outcomes.append(JobOutcome(item.job.id, error=f"generation failed: {output.error}"))
            else:
                outcomes.append(self._outcome(item, list(output.generated_tokens), elapsed))
        return outcomes

    def _generate(self, items: list[_Item], params: GenerationParams) -> list[JobOutcome]:
        width = max(len(item.ids) for item in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):  # left padding: the prompt ends where generation starts
            input_ids[row, width - len(item.ids) :] = torch.tensor(item.ids)
            attention[row, width - len(item.ids) :] = 1
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=self._config(params),
            )
        elapsed = time.perf_counter() - started
        new_tokens = output[:, width:].tolist()
        return [self._outcome(item, tokens, elapsed) for item, tokens in zip(items, new_tokens)]


@contextmanager
def _quiet_gguf_unpacking() -> Iterator[None]:
    """Silence the per-tensor progress bar transformers draws while unpacking a GGUF file.

    It is a bare `tqdm` in that module (not behind transformers' progress-bar switch), and
    it would garble a worker's log and `sumfleet run`'s own progress bar.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
