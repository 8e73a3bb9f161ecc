"""The transformers backend: a causal LM or an encoder-decoder summarizer, batched `generate`.

Loading (GGUF de-quantized once and cached as a plain checkpoint), device and dtype choice,
padding, per-row stopping and transformers' continuous batching live here; everything about
prompts and scheduling lives in the pipeline above.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import StaticLayer
from transformers.utils import logging as hf_logging

from models import defaults
from models.model_names import ModelSource
from models.settings import Settings
from worker.backends.attention import use_decode_attention
from worker.backends.base import LORA, SOFT_PROMPT, AdapterSpec, Generated, Row, Tokenizer, finish_reason
from worker.backends.cache import default_cache_dir, kept
from worker.backends.checkpoints import cached_checkpoint, write_checkpoint
from worker.hardware import cpu_has_fast_bf16

log = logging.getLogger(__name__)

_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def pick_device(setting: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA with bf16 and on CPUs with AMX/AVX-512 BF16, fp16 on older GPUs, else fp32.

    Measured on an AVX2-only CPU: bf16 generation ran 3.1x slower than fp32, so fp32 is
    the CPU default unless the CPU has native bf16.
    """
    if setting != "auto":
        dtype: torch.dtype = getattr(torch, setting)
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


class HfTokenizer:
    """A transformers tokenizer behind the pipeline's `Tokenizer` protocol."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        self.hf = tokenizer
        self.eos_ids = list(eos_ids)

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        return list(self.hf(text, add_special_tokens=special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        if not getattr(self.hf, "chat_template", None):
            return None
        return str(self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))


class TransformersBackend:
    """One loaded transformers model (causal LM or encoder-decoder) on one device."""

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, device: torch.device) -> None:
        self.model = model
        self.settings = settings
        self.device = device
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.tokenizer: Tokenizer = HfTokenizer(tokenizer, sorted(eos_ids))
        self.eos_set = frozenset(eos_ids)
        self.context_length = next(
            (v for v in (getattr(model.config, f, None) for f in _CONTEXT_FIELDS) if isinstance(v, int) and v > 0),
            None,
        )
        on_gpu = device.type == "cuda"
        self.input_cap = None if on_gpu else defaults.MAX_INPUT_TOKENS_CPU
        self.token_budget = defaults.TOKEN_BUDGET_GPU if on_gpu else defaults.TOKEN_BUDGET_CPU
        if on_gpu:
            self.max_batch_size = defaults.MAX_BATCH_SIZE_GPU
        elif model.dtype == torch.bfloat16:
            self.max_batch_size = defaults.MAX_BATCH_SIZE_CPU_BF16
            self.token_budget = defaults.TOKEN_BUDGET_CPU_BF16
        else:
            self.max_batch_size = defaults.MAX_BATCH_SIZE_CPU
        self.packs_itself = settings.batching == "continuous" and not self.encoder_decoder
        # A causal model on the CPU decodes into a KV cache allocated once per call (transformers'
        # static cache) instead of the dynamic one, which concatenates every layer's keys and values
        # at each step (30% of a decoding step). 24 BBC articles, bf16, AMX CPU: 1.86 / 1.89 docs/s
        # against 1.66 / 1.74, peak RSS 1,160-1,174 MiB against 1,265-1,319; float32 tokens the same
        # (README: Engines). Not used on GPUs (not measured there).
        self.static_cache = device.type == "cpu" and not self.encoder_decoder
        # With the static cache, a call's prompts are read in sub-batches of rows of about the same
        # length, each padded only to its own longest row, and copied into the call's cache; then
        # generate() decodes all rows together. Reading 16 prompts padded to the longest wasted 31%
        # on padding and ran its attention over the whole padded width (README: Engines).
        self.prefill_tokens = defaults.PREFILL_TOKENS_CPU if self.static_cache and _prefills_by_rows(model) else 0
        # bf16 on the CPU: a decoding step's attention as two bf16 products, not torch's SDPA kernel
        # (worker/backends/attention.py; README: Engines)
        self.decode_attention = device.type == "cpu" and not self.encoder_decoder and use_decode_attention(model)
        # what this transformers version calls the cache argument (`past_key_values` became `cache`)
        self.cache_keyword = _cache_keyword(model.get_decoder()) if self.prefill_tokens else "past_key_values"
        # bf16 on the CPU: the linear layers' weights are also held in oneDNN's blocked layout, so a
        # product does not re-layout its weight at every call (README: Engines)
        self.packed_weights = _pack_linear_weights(model) if device.type == "cpu" else 0
        self.adapter_methods = frozenset() if self.encoder_decoder else frozenset({SOFT_PROMPT, LORA})
        self.adapters = AdapterCache(self)
        self.input_prefix, self.task_generation = (
            _summarization_task(model.config) if self.encoder_decoder else ("", {})
        )

    @classmethod
    def load(cls, name: str, source: ModelSource, settings: Settings) -> TransformersBackend:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = pick_device(settings.device)
        dtype = pick_dtype(settings.dtype, device)
        started = time.perf_counter()
        location = source.location
        kwargs: dict[str, Any] = {"local_files_only": not settings.allow_download}
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
            model: Any = auto.from_pretrained(location, dtype=dtype, **kwargs)
        if gguf_path is not None and cached is None and settings.cache_checkpoints:
            write_checkpoint(model, tokenizer, gguf_path, cache_dir, dtype)
        model.to(device).eval()
        log.info(
            "loaded %s (%s%s) on %s from %s in %.1fs",
            name,
            dtype,
            ", encoder-decoder" if seq2seq else "",
            device,
            "cached checkpoint" if cached else location,
            time.perf_counter() - started,
        )
        return cls(model, tokenizer, settings, device)

    def generation_config(self, max_new_tokens: int, temperature: float = 0.0) -> GenerationConfig:
        """Greedy decoding for causal models; an encoder-decoder keeps its own settings (beams, ...)."""
        if self.encoder_decoder:
            config = copy.deepcopy(self.model.generation_config)
            for key, value in self.task_generation.items():
                setattr(config, key, value)
            config.max_new_tokens = max_new_tokens
            config.max_length = None
            config.pad_token_id = self.pad_id
        else:
            config = GenerationConfig(
                max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_ids
            )
            config.do_sample = False
        if temperature > 0:
            config.do_sample = True
            config.temperature = temperature
        return config

    def _call_config(self, rows: Sequence[Row]) -> GenerationConfig:
        """The generation config of one static call: its longest limit, its temperature, its cache."""
        config = self.generation_config(max(row.max_new_tokens for row in rows), rows[0].temperature)
        if self.static_cache:
            config.cache_implementation = "static"
        return config

    def is_out_of_memory(self, error: BaseException) -> bool:
        if not isinstance(error, torch.OutOfMemoryError):
            return False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        lora = rows[0].adapter if rows[0].adapter is not None and rows[0].adapter.lora else None
        if any((row.adapter if row.adapter is not None and row.adapter.lora else None) != lora for row in rows):
            raise ValueError("the rows of one call must share their LoRA adapter")
        with self.adapters.active(lora):
            # soft prompts: read with the prompts into the static cache where prompts are read in sub-batches
            # (generate() from embeddings ran soft-prompt rows at 0.63-0.71x the speed of plain ones: bench/tuning.py)
            if any(row.soft_tokens for row in rows):
                return self._generate(rows) if self.prefill_tokens else self._generate_embedded(rows)
            if self.packs_itself:
                return self._generate_continuous(rows)
            return self._generate(rows)

    def _generate_embedded(self, rows: Sequence[Row]) -> list[Generated]:
        """Rows with soft prompts: each row's input embeddings are its soft prompt (if any) then its
        prompt's token embeddings, left-padded, so rows with different soft prompts share a call."""
        embed = self.model.get_input_embeddings()
        prefixes = [
            self.adapters.soft_prompt(row.adapter) if row.soft_tokens and row.adapter is not None else None
            for row in rows
        ]
        lengths = [
            len(row.ids) + (0 if prefix is None else prefix.shape[0])
            for row, prefix in zip(rows, prefixes, strict=True)
        ]
        width = max(lengths)
        with torch.inference_mode():
            inputs = torch.zeros((len(rows), width, embed.embedding_dim), dtype=self.model.dtype, device=self.device)
            attention = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
            for number, (row, prefix, length) in enumerate(zip(rows, prefixes, lengths, strict=True)):
                tokens = embed(torch.tensor(row.ids, device=self.device))
                joined = tokens if prefix is None else torch.cat([prefix, tokens])
                inputs[number, width - length :] = joined
                attention[number, width - length :] = 1
            limits = [row.max_new_tokens for row in rows]
            stop = [] if len(set(limits)) == 1 else [_RowLimits(limits, 0, self.device)]
            started = time.perf_counter()
            output = self.model.generate(  # from embeddings, generate returns the new tokens only
                inputs_embeds=inputs,
                attention_mask=attention,
                generation_config=self._call_config(rows),
                stopping_criteria=StoppingCriteriaList(stop),
            )
        elapsed = time.perf_counter() - started
        return [self._generated(row, tokens, elapsed) for row, tokens in zip(rows, output.tolist(), strict=True)]

    def _generate(self, rows: Sequence[Row]) -> list[Generated]:
        """Rows through generate(); rows with soft prompts only where `_prefill` reads them (it puts a
        soft prompt's keys and values before its prompt's; generate() sees padding ids there)."""
        width = max(row.positions for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for number, row in enumerate(rows):
            # a decoder-only model needs left padding (the prompt ends where generation starts);
            # an encoder reads the whole input at once, so right padding is its usual layout
            span = slice(0, len(row.ids)) if self.encoder_decoder else slice(width - len(row.ids), width)
            input_ids[number, span] = torch.tensor(row.ids)
            attention[number, span.start - row.soft_tokens : span.stop] = 1  # a soft prompt's positions too
        limits = [row.max_new_tokens for row in rows]
        offset = 1 if self.encoder_decoder else width
        stop = [] if len(set(limits)) == 1 else [_RowLimits(limits, offset, self.device)]
        started = time.perf_counter()
        with torch.inference_mode():
            config, cache = self._call_config(rows), {}
            if self.prefill_tokens:  # every prompt but its last token read first, in sub-batches
                config.cache_implementation = None
                cache = {self.cache_keyword: self._prefill(rows, width + max(limits))}
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(stop),
                **cache,
            )
        elapsed = time.perf_counter() - started
        # a decoder-only model returns prompt + new tokens; an encoder-decoder the decoder start + new tokens
        new_tokens = output[:, offset:].tolist()
        return [self._generated(row, tokens, elapsed) for row, tokens in zip(rows, new_tokens, strict=True)]

    def _prefill(self, rows: Sequence[Row], length: int) -> StaticCache:
        """A static cache of `length` positions for `rows`, left-padded to the longest row, holding the
        keys and values of every row's soft prompt (if any) and prompt but its last token. Rows sorted by
        length are read in groups of at most `prefill_tokens` padded tokens, each group right-padded to
        its own longest row; a group with a soft prompt is read from embeddings."""
        width = max(row.positions for row in rows)
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        base = self.model.get_decoder()  # the model without its output layer (no logits to compute)
        initialized = False
        for group in _prefill_groups([row.positions - 1 for row in rows], self.prefill_tokens):
            lengths = [rows[i].positions - 1 for i in group]
            span = max(lengths)
            # right-padded: a row's tokens sit at positions 0.. and never attend to the padding after
            # them, so the group needs no mask and attention runs causal (no masked full square)
            ids = torch.full((len(group), span), self.pad_id, dtype=torch.long)
            for number, (i, size) in enumerate(zip(group, lengths, strict=True)):
                ids[number, size - len(rows[i].ids) + 1 : size] = torch.tensor(rows[i].ids[:-1])
            ids = ids.to(self.device)
            read = DynamicCache(config=self.model.config)
            inputs: dict[str, Any] = {"input_ids": ids}
            if any(rows[i].soft_tokens for i in group):
                inputs = {"inputs_embeds": self._soft_embeddings([rows[i] for i in group], ids)}
            base(**inputs, use_cache=True, **{self.cache_keyword: read})
            sources: list[Any] = list(read.layers)  # full-attention layers: keys and values tensors
            if not initialized:
                cache.early_initialization(
                    len(rows),
                    [layer.keys.shape[1] for layer in sources],
                    [layer.keys.shape[-1] for layer in sources],
                    sources[0].keys.dtype,
                    self.device,
                )
                initialized = True
            for into, source in zip(cache.layers, sources, strict=True):
                assert isinstance(into, StaticLayer) and into.keys is not None and into.values is not None
                for number, (i, size) in enumerate(zip(group, lengths, strict=True)):
                    into.keys[i, :, width - 1 - size : width - 1] = source.keys[number, :, :size]
                    into.values[i, :, width - 1 - size : width - 1] = source.values[number, :, :size]
        if initialized:  # generate() goes on from there (nothing read: it fills the cache itself)
            for layer in cache.layers:
                assert isinstance(layer, StaticLayer)
                layer.cumulative_length.fill_(width - 1)
        return cache

    def _soft_embeddings(self, rows: Sequence[Row], ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of `ids` (a prefill group, each row's soft prompt positions first), with
        each row's soft prompt in its first positions."""
        embeddings = self.model.get_input_embeddings()(ids)
        for number, row in enumerate(rows):
            if row.soft_tokens and row.adapter is not None:
                embeddings[number, : row.soft_tokens] = self.adapters.soft_prompt(row.adapter)
        return embeddings

    def _generated(self, row: Row, tokens: list[int], elapsed: float) -> Generated:
        """A row's new tokens (cut to its own limit: rows of a call may differ) and why they stopped;
        a row that ended early is padded after its end-of-sequence token."""
        limited = tokens[: row.max_new_tokens]
        return Generated(limited, elapsed, finish_reason=finish_reason(limited, row.max_new_tokens, self.eos_set))

    def leave_decode_attention(self) -> None:
        """Decoding steps through torch's SDPA kernel again, as prompts are (worker/backends/attention.py)."""
        if self.decode_attention:
            self.model.set_attn_implementation("sdpa")
            self.decode_attention = False

    def _generate_continuous(self, rows: Sequence[Row]) -> list[Generated]:
        """transformers' continuous batching (paged attention; finished sequences leave, waiting ones join)."""
        self.leave_decode_attention()  # generate_batch takes only its own attention names
        limit = max(row.max_new_tokens for row in rows)
        started = time.perf_counter()
        with torch.inference_mode():
            results = self.model.generate_batch(
                inputs=[row.ids for row in rows],
                generation_config=self.generation_config(limit, rows[0].temperature),
                max_new_tokens=limit,
            )
        elapsed = time.perf_counter() - started
        outputs = list(results.values())
        if len(outputs) != len(rows):
            raise RuntimeError(f"continuous batching returned {len(outputs)} results for {len(rows)} prompts")
        return [
            Generated(None, elapsed, str(output.error))
            if output.error
            else self._generated(row, list(output.generated_tokens), elapsed)
            for row, output in zip(rows, outputs, strict=True)
        ]


class _RowLimits(StoppingCriteria):
    """Each row of a generate() call stops at its own token limit (a piece's summary may be
    longer than a whole short document's), so rows of different limits share one call."""

    def __init__(self, limits: list[int], offset: int, device: torch.device) -> None:
        self.limits = torch.tensor(limits, device=device)
        self.offset = offset  # where generated tokens start in the sequences generate() passes

    def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
        return (input_ids.shape[1] - self.offset) >= self.limits


def _prefill_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indexes of `lengths` (tokens to read per row) shortest first, cut into groups whose rows
    padded to the group's longest hold at most `budget` tokens (a longer row reads alone); rows
    with nothing to read are left out."""
    groups: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if lengths[index] <= 0:
            continue
        if current and (len(current) + 1) * lengths[index] > budget:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups


def _cache_keyword(model: Any) -> str:
    """The name of `model.forward`'s cache argument (generate() takes the same name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefills_by_rows(model: Any) -> bool:
    """Whether the model's static cache is plain full-attention layers (no sliding windows), the
    layout `_prefill` fills."""
    try:
        probe = StaticCache(config=model.config, max_cache_len=8)
    except (TypeError, ValueError, AttributeError):
        return False
    return all(type(layer) is StaticLayer for layer in probe.layers)


def _pack_linear_weights(model: Any) -> int:
    """Give every bf16 `nn.Linear` of `model` a copy of its weight in oneDNN's blocked layout, used
    when no gradient is wanted (generation); training (tuning) goes through the plain weights. The
    number of layers packed; 0 where the float32 model, the build or a check of the product says no."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return 0
    layers = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.dim() == 2
    ]
    if not layers:
        return 0
    with torch.inference_mode():
        try:
            weight = layers[0].weight
            probe = torch.randn((3, weight.shape[1]), dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
            if not torch.allclose(got.float(), torch.nn.functional.linear(probe, weight).float(), atol=1e-2, rtol=1e-2):
                log.warning("oneDNN's packed bf16 product disagrees with torch's here; weights left as they are")
                return 0
        except RuntimeError as error:  # a build without these kernels
            log.warning("oneDNN cannot pack bf16 weights here (%s); weights left as they are", error)
            return 0
        for layer in layers:
            layer.sumfleet_packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
            layer.forward = partial(_packed_linear, layer)  # type: ignore[method-assign]
    return len(layers)


def unpack_linear_weights(model: Any) -> None:
    """Undo `_pack_linear_weights` (the plain product again; for benchmarks)."""
    for module in model.modules():
        if hasattr(module, "sumfleet_packed"):
            del module.sumfleet_packed
            module.__dict__.pop("forward", None)


def _packed_linear(layer: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() or inputs.dtype != torch.bfloat16:
        return torch.nn.functional.linear(inputs, layer.weight, layer.bias)
    return torch.ops.mkldnn._linear_pointwise(inputs, layer.sumfleet_packed, layer.bias, "none", [], "")


def _summarization_task(config: Any) -> tuple[str, dict[str, object]]:
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
    return str(prefix), {key: task[key] for key in wanted if key in task}


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
    gguf_utils.tqdm = partial(original, disable=True)  # type: ignore[assignment]
    try:
        yield
    finally:
        gguf_utils.tqdm = original


class AdapterCache:
    """The adapters a backend has loaded, at most CAPACITY of each kind (least recently used out)."""

    CAPACITY = 8

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.loras: OrderedDict[str, None] = OrderedDict()

    def soft_prompt(self, spec: AdapterSpec) -> torch.Tensor:
        """The soft prompt's embeddings ([virtual tokens, hidden]) in the model's dtype and device."""

        def load() -> torch.Tensor:
            from safetensors.torch import load_file

            weights = load_file(str(Path(spec.path) / "adapter_model.safetensors"))
            if "prompt_embeddings" not in weights:
                raise ValueError(f"adapter {spec.ref} holds no soft prompt (keys: {sorted(weights)[:4]})")
            vectors = weights["prompt_embeddings"]
            spec.check_soft_prompt(vectors.shape, int(self.backend.model.get_input_embeddings().weight.shape[1]))
            return vectors.to(self.backend.device, self.backend.model.dtype)

        return kept(self.prompts, spec.ref, load, self.CAPACITY)

    @contextmanager
    def active(self, spec: AdapterSpec | None) -> Iterator[None]:
        """Run the block with LoRA `spec` on (None: with every LoRA off)."""
        model = self.backend.model
        if spec is None:
            if hasattr(model, "disable_adapter") and self.loras:
                with model.disable_adapter():
                    yield
            else:
                yield
            return
        if spec.ref not in self.loras:
            self._load_lora(spec)
        self.loras.move_to_end(spec.ref)
        self.backend.model.set_adapter(spec.ref)
        yield

    def _load_lora(self, spec: AdapterSpec) -> None:
        from peft import PeftModel

        if not self.loras:
            self.backend.model = PeftModel.from_pretrained(self.backend.model, spec.path, adapter_name=spec.ref)
        else:
            self.backend.model.load_adapter(spec.path, adapter_name=spec.ref)
        self.backend.model.eval()
        self.loras[spec.ref] = None
        while len(self.loras) > self.CAPACITY:
            oldest, _ = self.loras.popitem(last=False)
            self.backend.model.delete_adapter(oldest)
