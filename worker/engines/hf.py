"""The transformers engine: a causal LM (chat-templated prompts) or an encoder-decoder summarizer,
length-packed batched `generate`, map-reduce over documents longer than the usable context."""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from functools import partial
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as hf_logging

from models import defaults
from models.settings import Settings
from models.store import ClaimedJob, JobOutcome
from worker.batching import batch_cost, take_batch
from worker.engines.cache import cached_checkpoint, default_cache_dir, write_checkpoint
from worker.engines.base import GenerationParams
from worker.engines.loading import ModelSource
from worker.prompts import PIECE_TEMPLATES, PromptPlan
from worker.splitting import split_document

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
class _Doc:
    """A job on its way through the engine: one prompt, or the levels of a long document."""

    job: ClaimedJob
    variant: str | None  # the prompt variant that ran (None: a seq2seq model, no template)
    language: str
    template: str | None  # the batch's template for this document (its last level)
    level: int = 1
    pieces: int = 1  # pieces at the first level
    parts: list[str | None] = field(default_factory=list)  # summaries of this level's pieces
    waiting: int = 0  # pieces of this level not generated yet
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    closed: bool = False  # its outcome was handed back


@dataclass(slots=True)
class _Item:
    """One row of a `generate` call: a whole document's prompt, a piece's, or a chat request."""

    doc: _Doc
    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    slot: int = 0  # which piece of the document's level
    final: bool = True  # its text is the document's summary


@dataclass(slots=True)
class _Generated:
    item: _Item
    tokens: list[int] | None
    error: str | None
    seconds: float


class TransformersEngine:
    """One loaded model (causal LM or encoder-decoder). Documents are sorted by length and
    packed under a token budget; long ones are summarized piece by piece (map-reduce)."""

    def __init__(self, name: str, model, tokenizer, settings: Settings, device: torch.device) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        default_budget = defaults.TOKEN_BUDGET_GPU if device.type == "cuda" else defaults.TOKEN_BUDGET_CPU
        self.configured_budget = settings.token_budget or default_budget
        self.budget = self.configured_budget  # lowered for the rest of a chunk after out-of-memory
        if device.type == "cuda":
            default_size = defaults.MAX_BATCH_SIZE_GPU
        elif model.dtype == torch.bfloat16:
            default_size = defaults.MAX_BATCH_SIZE_CPU_BF16
        else:
            default_size = defaults.MAX_BATCH_SIZE_CPU
        self.max_batch_size = settings.max_batch_size or default_size
        self.context = usable_context(model.config, settings, device)
        self.prefix, self.task_generation = _summarization_task(model.config) if self.seq2seq else ("", {})
        self._overheads: dict[tuple[str, str], int] = {}

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
            # GGUF files hold decoder-only models; anything else says what it is in its config
            config = None if "gguf_file" in kwargs else AutoConfig.from_pretrained(location, **kwargs)
            seq2seq = bool(getattr(config, "is_encoder_decoder", False))
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = auto.from_pretrained(location, dtype=dtype, **kwargs)
        if gguf_path is not None and cached is None and settings.cache_checkpoints:
            write_checkpoint(model, tokenizer, gguf_path, cache_dir, dtype)
        model.to(device).eval()
        log.info(
            "loaded %s (%s%s) on %s from %s in %.1fs",
            name, dtype, ", encoder-decoder" if seq2seq else "", device,
            "cached checkpoint" if cached else location, time.perf_counter() - started,
        )
        return cls(name, model, tokenizer, settings, device)

    # -- prompts ---------------------------------------------------------------------------

    def wrap(self, content: str) -> list[int]:
        """Token ids of one user message as this model takes it.

        Chat models get their chat template; encoder-decoder models get the text with the
        prefix their config asks for (T5's "summarize: "); other models the plain text.
        """
        if self.seq2seq:
            return self.tokenizer(self.prefix + content)["input_ids"]
        if getattr(self.tokenizer, "chat_template", None):
            content = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return self.tokenizer(content, add_special_tokens=False)["input_ids"]

    def _content(self, prompt: PromptPlan, template: str, language: str, document: str) -> str:
        # an encoder-decoder summarizer is trained on bare documents: no instruction around it
        return document if self.seq2seq else prompt.render(template, document, language)

    def _fit(self, prompt: PromptPlan, template: str, language: str, document: str) -> list[int]:
        """The prompt's ids, the document cut so that they fit the usable context."""
        ids = self.wrap(self._content(prompt, template, language, document))
        limit = self.context
        if len(ids) <= limit:
            return ids
        doc_ids = self.tokenizer(document, add_special_tokens=False)["input_ids"]
        keep = max(1, len(doc_ids) - (len(ids) - limit))
        cut = self.tokenizer.decode(doc_ids[:keep], skip_special_tokens=True)
        return self.wrap(self._content(prompt, template, language, cut))[:limit]

    def encode(self, prompt: PromptPlan, document: str) -> tuple[str | None, list[int]]:
        """(variant, prompt token ids) of a whole document, cut to fit the usable context."""
        variant, template, language = prompt.for_document(document)
        return (None if self.seq2seq else variant), self._fit(prompt, template, language, document)

    def _chat(self, request: dict[str, object]) -> list[int]:
        """A job's own chat messages, through the chat template (or joined, for other models)."""
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in request["messages"]]  # type: ignore[union-attr]
        if not self.seq2seq and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        joined = "\n\n".join(m["content"] for m in messages)
        return self.wrap(joined) if self.seq2seq else self.tokenizer(joined, add_special_tokens=False)["input_ids"]

    def _count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def _overhead(self, template: str, language: str, prompt: PromptPlan) -> int:
        key = (template, language)
        if key not in self._overheads:
            self._overheads[key] = len(self.wrap(self._content(prompt, template, language, "")))
        return self._overheads[key]

    # -- long documents --------------------------------------------------------------------

    def _start(self, job: ClaimedJob, prompt: PromptPlan, params: GenerationParams) -> list[_Item]:
        """The first generation rows of a job."""
        if job.request is not None:
            ids = self._chat(job.request)
            if len(ids) > self.context:
                raise ValueError(
                    f"the request is {len(ids)} tokens, over this model's usable context of {self.context} tokens"
                )
            doc = _Doc(job, "chat", "", None)
            limit = int(job.request.get("max_new_tokens") or params.max_new_tokens)  # type: ignore[call-overload]
            temperature = float(job.request.get("temperature") or 0.0)  # type: ignore[arg-type]
            return [_Item(doc, ids, min(limit, defaults.MAX_NEW_TOKENS_LIMIT), temperature)]
        variant, template, language = prompt.for_document(job.text)
        doc = _Doc(job, None if self.seq2seq else variant, language, template)
        if params.long_documents == "truncate":
            return [_Item(doc, self._fit(prompt, template, language, job.text), params.max_new_tokens)]
        return self._level(doc, job.text, prompt, params)

    def _level(self, doc: _Doc, text: str, prompt: PromptPlan, params: GenerationParams) -> list[_Item]:
        """Rows for `text` at the document's current level: the final prompt if it fits, else its pieces."""
        assert doc.template is not None
        ids = self.wrap(self._content(prompt, doc.template, doc.language, text))
        if len(ids) <= self.context or doc.level >= defaults.MAX_LEVELS:
            if len(ids) > self.context:
                ids = self._fit(prompt, doc.template, doc.language, text)
            return [_Item(doc, ids, params.max_new_tokens)]
        piece_template = PIECE_TEMPLATES.get(doc.language, PIECE_TEMPLATES["en"])
        overhead = self._overhead(piece_template, doc.language, prompt)
        limit = max(32, self.context - overhead - defaults.PIECE_MARGIN)
        pieces = split_document(text, limit, self._count)
        if len(pieces) < 2:  # nothing to split on: cut instead
            return [_Item(doc, self._fit(prompt, doc.template, doc.language, text), params.max_new_tokens)]
        if doc.level == 1:
            doc.pieces = len(pieces)
        doc.parts = [None] * len(pieces)
        doc.waiting = len(pieces)
        # a piece's summary is at most a third of the piece, so every level shrinks the text
        piece_tokens = max(8, min(max(params.max_new_tokens, defaults.MAP_NEW_TOKENS), limit // 3))
        return [
            _Item(doc, self._fit(prompt, piece_template, doc.language, piece), piece_tokens, slot=slot, final=False)
            for slot, piece in enumerate(pieces)
        ]

    def _advance(
        self, done: _Generated, prompt: PromptPlan, params: GenerationParams
    ) -> tuple[JobOutcome | None, list[_Item]]:
        """Take one generated row: the document's outcome when it is finished, or its next rows."""
        item, doc = done.item, done.item.doc
        if doc.closed:  # another piece of it failed already
            return None, []
        doc.seconds += done.seconds
        doc.prompt_tokens += len(item.ids)
        if item.final:
            where = "" if doc.level == 1 else f" (level {doc.level}: the summary of the piece summaries)"
        else:
            where = f" (level {doc.level}, piece {item.slot + 1} of {len(doc.parts)})"
        if done.error is not None or done.tokens is None:
            doc.closed = True
            return JobOutcome(doc.job.id, error=f"generation failed{where}: {done.error}"), []
        text, used = self._decode(done.tokens)
        doc.output_tokens += used
        if item.final:
            doc.closed = True
            return self._outcome(doc, text), []
        doc.parts[item.slot] = text
        doc.waiting -= 1
        if doc.waiting:
            return None, []
        joined = "\n\n".join(part for part in doc.parts if part)
        if not joined:
            doc.closed = True
            return JobOutcome(doc.job.id, error=f"the model produced empty summaries for all {len(doc.parts)} pieces"), []
        doc.level += 1
        return None, self._level(doc, joined, prompt, params)

    # -- generation ------------------------------------------------------------------------

    def run(self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams) -> Iterator[list[JobOutcome]]:
        pending: list[_Item] = []
        failed: list[JobOutcome] = []
        for job in jobs:
            try:
                pending.extend(self._start(job, prompt, params))
            except Exception as error:  # one bad document must not sink its chunk
                failed.append(JobOutcome(job.id, error=f"could not build the prompt: {_describe(error)}"))
        if failed:
            yield failed
        self.budget = self.configured_budget
        while pending:  # a round: every row ready now, then the next levels of long documents
            following: list[_Item] = []
            groups: dict[float, list[_Item]] = {}  # one sampling setting per generate() call
            for item in pending:
                groups.setdefault(item.temperature, []).append(item)
            for temperature, group in sorted(groups.items()):
                group.sort(key=lambda item: len(item.ids))
                for rows in self._batches(group):
                    max_new = max(item.max_new_tokens for item in rows)  # each row stops at its own limit
                    outcomes: list[JobOutcome] = []
                    for done in self._generate_safely(rows, max_new, temperature):
                        outcome, more = self._advance(done, prompt, params)
                        if outcome is not None:
                            outcomes.append(outcome)
                        following.extend(more)
                    yield outcomes  # possibly empty: a chance to stop between batches
            pending = following

    def _batches(self, group: list[_Item]) -> Iterator[list[_Item]]:
        """`group` (sorted by length) in generate() calls, packed one at a time so a lowered budget applies at once."""
        if self.settings.batching == "continuous" and not self.seq2seq:
            yield group
            return
        lengths = [len(item.ids) for item in group]
        max_new_tokens = max(item.max_new_tokens for item in group)
        start = 0
        while start < len(group):
            end = take_batch(lengths, start, max_new_tokens, self.budget, self.max_batch_size)
            yield group[start:end]
            start = end

    def _generate_safely(self, items: list[_Item], max_new_tokens: int, temperature: float) -> list[_Generated]:
        """Generate a batch; on any error split it in half, down to the failing row.

        Out of memory also lowers the token budget for the rest of the chunk.
        """
        try:
            if self.settings.batching == "continuous" and not self.seq2seq:
                return self._generate_continuous(items, max_new_tokens, temperature)
            return self._generate(items, max_new_tokens, temperature)
        except Exception as error:
            if isinstance(error, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                cost = batch_cost(max(len(i.ids) for i in items), max_new_tokens, len(items))
                self.budget = max(defaults.MIN_TOKEN_BUDGET, min(self.budget, cost // 2))
                log.warning("out of memory on %d rows; token budget now %d", len(items), self.budget)
            if len(items) == 1:
                log.warning("job %s failed: %s", items[0].doc.job.id, _describe(error))
                return [_Generated(items[0], None, _describe(error), 0.0)]
            half = len(items) // 2
            return self._generate_safely(items[:half], max_new_tokens, temperature) + self._generate_safely(
                items[half:], max_new_tokens, temperature
            )

    def generation_config(self, max_new_tokens: int, temperature: float = 0.0) -> GenerationConfig:
        """Greedy decoding for causal models; an encoder-decoder keeps its own settings (beams, ...)."""
        if self.seq2seq:
            config = copy.deepcopy(self.model.generation_config)
            for key, value in self.task_generation.items():
                setattr(config, key, value)
            config.max_new_tokens = max_new_tokens
            config.max_length = None
            config.pad_token_id = self.pad_id
        else:
            config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
            config.do_sample = False
        if temperature > 0:
            config.do_sample = True
            config.temperature = temperature
        return config

    def _decode(self, tokens: list[int]) -> tuple[str, int]:
        """(text, tokens used) of a generated row, up to its end-of-sequence token."""
        cut = _until_eos(tokens, self.eos_ids)
        # a length cut can split a multi-byte character between tokens: drop the stray half
        return self.tokenizer.decode(cut, skip_special_tokens=True).rstrip("\ufffd").strip(), len(cut)

    def _outcome(self, doc: _Doc, summary: str) -> JobOutcome:
        return JobOutcome(
            doc.job.id,
            summary=summary or None,
            error=None if summary else "the model produced an empty summary",
            prompt_tokens=doc.prompt_tokens,
            prompt_variant=doc.variant,
            output_tokens=doc.output_tokens,
            generation_seconds=doc.seconds,
            pieces=doc.pieces,
            levels=doc.level,
        )

    def _generate_continuous(self, items: list[_Item], max_new_tokens: int, temperature: float) -> list[_Generated]:
        """transformers' continuous batching (paged attention; finished sequences leave, waiting ones join)."""
        started = time.perf_counter()
        with torch.inference_mode():
            results = self.model.generate_batch(
                inputs=[item.ids for item in items],
                generation_config=self.generation_config(max_new_tokens, temperature),
                max_new_tokens=max_new_tokens,
            )
        elapsed = time.perf_counter() - started
        outputs = list(results.values())
        if len(outputs) != len(items):
            raise RuntimeError(f"continuous batching returned {len(outputs)} results for {len(items)} prompts")
        return [
            _Generated(item, None, str(output.error), elapsed)
            if output.error
            else _Generated(item, list(output.generated_tokens)[: item.max_new_tokens], None, elapsed)
            for item, output in zip(items, outputs)
        ]

    def _generate(self, items: list[_Item], max_new_tokens: int, temperature: float) -> list[_Generated]:
        width = max(len(item.ids) for item in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            # a decoder-only model needs left padding (the prompt ends where generation starts);
            # an encoder reads the whole input at once, so right padding is its usual layout
            span = slice(0, len(item.ids)) if self.seq2seq else slice(width - len(item.ids), width)
            input_ids[row, span] = torch.tensor(item.ids)
            attention[row, span] = 1
        limits = [item.max_new_tokens for item in items]
        stop = [] if len(set(limits)) == 1 else [_RowLimits(limits, 1 if self.seq2seq else width, self.device)]
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=self.generation_config(max_new_tokens, temperature),
                stopping_criteria=StoppingCriteriaList(stop),
            )
        elapsed = time.perf_counter() - started
        # a decoder-only model returns prompt + new tokens; an encoder-decoder the decoder start + new tokens
        new_tokens = output[:, 1:].tolist() if self.seq2seq else output[:, width:].tolist()
        return [_Generated(item, tokens[: item.max_new_tokens], None, elapsed) for item, tokens in zip(items, new_tokens)]


class _RowLimits(StoppingCriteria):
    """Each row of a generate() call stops at its own token limit (a piece's summary may be
    longer than a whole short document's), so rows of different limits share one call."""

    def __init__(self, limits: list[int], offset: int, device: torch.device) -> None:
        self.limits = torch.tensor(limits, device=device)
        self.offset = offset  # where generated tokens start in the sequences generate() passes

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        return (input_ids.shape[1] - self.offset) >= self.limits


def _summarization_task(config) -> tuple[str, dict[str, object]]:  # type: ignore[no-untyped-def]
    """(input prefix, generation settings) an encoder-decoder's config gives for summarization.

    T5 checkpoints carry `task_specific_params["summarization"]` with the "summarize: "
    prefix and beam settings; BART and PEGASUS fine-tunes put theirs in the generation
    config and take the document bare. A T5 without those params still gets the prefix.
    """
    task = dict((getattr(config, "task_specific_params", None) or {}).get("summarization") or {})
    prefix = task.pop("prefix", None)
    if prefix is None:
        prefix = "summarize: " if getattr(config, "model_type", "") in {"t5", "mt5", "umt5", "longt5"} else ""
    wanted = ("num_beams", "length_penalty", "no_repeat_ngram_size", "early_stopping", "min_length")
    return prefix, {key: task[key] for key in wanted if key in task}


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
