"""The llama.cpp backend (`llama-cpp-python`): a GGUF file run with llama.cpp's own CPU kernels.

Weights stay in a GGUF type. llama.cpp has fast matrix kernels (tinyBLAS, repacked layouts) for
f16, bf16, q8_0 and q4_0 on x86 AVX2 and ARM, but none for Q4_1, the bundled SmolLM2's type: its
prompt reading ran at 165 tokens/s against 345-383 for the same weights in f16 (2 AVX2 cores). So
`SUMFLEET_LLAMACPP_WEIGHTS=auto` converts a small Q4_1 model to f16 once (llama.cpp's own
quantizer; f16 holds Q4_1's values to within f16 rounding), or to bf16 where the CPU and the build
multiply bf16 natively (AVX-512 BF16), and caches the file by content. Rows
of a call decode together, one sequence each in a KV stream of its own (a row attends over its
own cells only): the prompts are read in one pass, then every step adds one token for each row still
going, so each decode step is one matrix product for all rows; the prompt tokens all rows start with
(the chat template's opening and the instruction) are read once and copied into every row's stream.
Each row stops at its own limit or an end-of-generation token. With continuous batching
(`generate_stream`, what SUMFLEET_BATCHING=auto picks here) a row that finishes gives its stream to
the next waiting one, so steps stay full while rows wait. The chat template comes from the
GGUF's metadata, rendered like transformers renders it (a sandboxed Jinja environment), so prompts
match token for token. A row with a soft prompt (prompt tuning) has it read into its stream first, as
input embeddings at the positions before its prompt. A LoRA (of a llama-architecture model) is converted
to llama.cpp's LoRA format when first used and applied to the calls of its rows (`peft_files`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import defaults
from models.errors import ConfigError
from models.model_names import ModelSource
from models.settings import Settings
from worker.backends.base import LORA, SOFT_PROMPT, AdapterSpec, Generated, Row, Tokenizer, finish_reason
from worker.backends.cache import content_digest, default_cache_dir, kept
from worker.backends.peft_files import lora_tensors, read_soft_prompt, write_lora_gguf
from worker.batching import batch_cost
from worker.hardware import cpu_flags, cpu_model

log = logging.getLogger(__name__)

# KV cells of a call's rows: (longest prompt + new tokens, in blocks of 256) x rows, the pipeline's
# budget (about 23 KB each for SmolLM2-135M: 94 MB). Measured on 16 BBC articles (2 AVX2 cores): 6144
# cells ran about 8% faster (0.63-0.67 vs 0.58-0.60 docs/s) at 519 MiB peak RSS instead of 474;
# 4096 keeps a worker under 0.5 GiB.
TOKEN_BUDGET = 4096
MAX_BATCH_SIZE = 16  # sequences decoded together
STREAM_ALIGN = 256  # llama.cpp gives each row's KV stream cells in blocks of 256
PREFILL_TOKENS = 2048  # prompt tokens per llama_decode call (n_batch)
# tokens per llama.cpp compute pass (n_ubatch): without flash attention a pass holds its tokens' scores
# over the whole stream, and 256 ran a batch 1.03x faster than 512 (24 BBC articles, AMX machine; 128 the
# same as 256, 2,048 0.93x); with it, llama.cpp's default of 512
UBATCH_TOKENS = {True: 512, False: 256}
# a call's rows share the prompt tokens they all start with when there are at least this many: below
# that, copying whole KV streams (about 18 MB each for 768 cells of SmolLM2-135M) costs about what it saves
MIN_SHARED_PREFIX = 8
SOFT_PROMPT_CAPACITY = 8  # soft prompts kept loaded (a few KB to a few hundred KB each)
LORA_CAPACITY = 8  # LoRAs kept loaded (rank 8 on SmolLM2-135M's q/k/v/o: 3.7 MB each in float32)
# GGUF file types (llama.cpp's LLAMA_FTYPE_*) by the names SUMFLEET_LLAMACPP_WEIGHTS takes
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}
# f16 and bf16 files keep the token embedding table in q8_0 (GGML_TYPE_Q8_0): it is read a row per
# token and, tied as the output layer, multiplied only for each row's last position, so 16-bit buys
# no speed there; q8_0 saves 26 MB of SmolLM2's 258 (greedy texts: see the README's Engines table)
SMALL_EMBEDDINGS = {"f16", "bf16"}
GGML_TYPE_Q8_0 = 8
Q4_1 = 3
CONVERT_UP_TO_PARAMETERS = 1_000_000_000  # auto converts Q4_1 to f16 only this small (f16 is 3.6x the bytes)
# GGUF file types whose weights llama.cpp's AMX kernels multiply (LLAMA_FTYPE_MOSTLY_Q4_0, Q4_1, Q8_0)
AMX_FILE_TYPES = frozenset({2, Q4_1, 7})
# Run in a child process on the model about to be loaded: its AMX buffers on (llama.cpp's default), 64
# prompt tokens read in one batch (the tile kernels; one token takes a VNNI path). A faulty build dies.
AMX_PROBE = """
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_batch=64, n_ubatch=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8)[:64])
print("sound")
"""
_amx_verdicts: dict[str, bool] = {}  # by the ggml CPU library's digest: its AMX kernels ran or faulted
# SUMFLEET_LLAMACPP_FLASH_ATTENTION=auto measures both ways at load (`measure_flash_attention`): a call of a
# few rows through the backend's own generate, each way twice (on, off, off, on). Which is faster depends on
# the CPU, not on a flag one can read: off ran the engine 1.39x faster on a Xeon with AMX, on 1.24x faster
# on an AMD EPYC with AVX-512 (both 2 cores, 24 BBC articles)
# a call as the pipeline makes one for summaries: rows in streams of 768 cells (4,096 hold 5), about 9 prompt
# tokens read for each token decoded (a BBC article's prompt is about 450 tokens, its summary 48)
FLASH_PROBE_ROWS = 4
FLASH_PROBE_PROMPT = 192
FLASH_PROBE_NEW = 20
_flash_verdicts: dict[str, bool] = {}  # by machine, llama.cpp build and model file: flash attention on


@dataclass(eq=False)
class _Running:
    """A row in a KV stream: its index in the call, when it got the stream, and its tokens so far."""

    number: int
    began: float
    outputs: list[int] = field(default_factory=list)


class KVCacheFull(MemoryError):
    """Raised when a call's rows do not fit the KV cache (the pipeline then halves the call)."""


class LlamaCppTokenizer:
    """llama.cpp's tokenizer for the loaded GGUF, and its chat template."""

    def __init__(self, llm: Any, eos_ids: Sequence[int]) -> None:
        self.llm = llm
        self.eos_ids = list(eos_ids)
        self.template = None
        source = llm.metadata.get("tokenizer.chat_template")
        if source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        data = text.encode("utf-8", "replace")
        return list(self.llm.tokenize(data, add_bos=special_tokens, special=True))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(self.llm.detokenize(list(ids))).decode("utf-8", "replace")

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        if self.template is None:
            return None
        return str(self.template.render(messages=list(messages), add_generation_prompt=True))


class LlamaCppBackend:
    """One GGUF model in llama.cpp, on the CPU."""

    def __init__(self, llm: Any, settings: Settings) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llm
        model = llm._model.model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        end = [i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, i)]
        self.tokenizer: Tokenizer = LlamaCppTokenizer(llm, end)
        self.end = frozenset(end)
        self.context_length: int | None = int(llama_cpp.llama_model_n_ctx_train(model)) or None
        self.input_cap: int | None = defaults.MAX_INPUT_TOKENS_CPU
        self.encoder_decoder = False
        self.input_prefix = ""
        self.packs_itself = False
        # soft prompts (prompt tuning) go in as input embeddings before a row's prompt; LoRAs, converted to
        # llama.cpp's LoRA format, apply to a whole call (the pipeline gives a call rows of one LoRA), on
        # llama-architecture models (the base weights' rotary row order is known: peft_files)
        self.architecture = str(llm.metadata.get("general.architecture", ""))
        self.adapter_methods = frozenset({SOFT_PROMPT, LORA} if self.architecture == "llama" else {SOFT_PROMPT})
        self.loras: OrderedDict[str, Any] = OrderedDict()  # by adapter ref: llama.cpp's loaded LoRAs, the last few
        self.lora: Any = None  # the LoRA of the rows being run (None: none)
        self.width = int(llama_cpp.llama_model_n_embd(model))  # a soft prompt's vectors are this long
        self.soft_prompts: OrderedDict[str, np.ndarray] = OrderedDict()  # by adapter ref, the last few used
        self.cell_alignment = STREAM_ALIGN  # the pipeline packs calls by what the streams really take
        self.max_batch_size = settings.max_batch_size or MAX_BATCH_SIZE
        self.token_budget = settings.token_budget or TOKEN_BUDGET
        self.threads = settings.threads or len(os.sched_getaffinity(0))
        self.model = model
        self.ctx: Any = None  # made for the first call, remade when a call needs more streams or longer ones
        self.memory: Any = None
        self.shape = (0, 0)  # the context's (sequences, cells per sequence)
        self.rng = np.random.default_rng()
        # continuous batching (`generate_stream`): rows join as others finish; SUMFLEET_BATCHING=static
        # leaves the pipeline's packed calls to `generate`
        self.streams_rows = settings.batching != "static"
        self.share_prefix = True  # off: every row reads its whole prompt (bench/engines.py compares both)
        self.prompt_tokens_shared = 0  # prompt tokens not computed because a call's rows shared them (all calls)
        self.amx = False  # the weights are in llama.cpp's AMX buffers (its AMX kernels multiply them)
        self.path: Path | None = None  # the GGUF file the weights come from (to load them again)
        # True: on, False: off, None: llama.cpp's own choice (on, for its CPU backend)
        self.flash_attention = flash_attention(settings.llamacpp_flash_attention)

    @classmethod
    def load(cls, name: str, source: ModelSource, settings: Settings) -> LlamaCppBackend:
        if not source.gguf_file:
            raise ConfigError(
                f"SUMFLEET_ENGINE=llama.cpp runs GGUF files; model {name!r} is a {source.kind} "
                "(give a .gguf file, or use SUMFLEET_ENGINE=transformers)"
            )
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError(
                'SUMFLEET_ENGINE=llama.cpp needs llama-cpp-python: pip install "sumfleet[llamacpp]"'
            ) from None
        if settings.device not in ("auto", "cpu"):
            raise ConfigError(f"the llama.cpp backend runs on the CPU here; SUMFLEET_DEVICE={settings.device}")
        started = time.perf_counter()
        threads = settings.threads or len(os.sched_getaffinity(0))
        path = Path(source.location) / source.gguf_file
        llm = open_gguf(path, threads)
        file_type = int(llm.metadata.get("general.file_type", -1))
        # llama.cpp's AMX kernels, where the build has them, only once a child process ran them on this
        # file's weights without faulting (a GCC 12 build's faulted), and only while torch is not in this
        # process (`_leave_amx_beside_torch`; README: Engines)
        amx = file_type in AMX_FILE_TYPES and amx_built() and "torch" not in sys.modules and amx_sound(path, settings)
        target = weight_type(
            settings.llamacpp_weights, file_type, int(llama_cpp.llama_model_n_params(llm._model.model)), amx
        )
        running = path
        if target is not None or amx:
            llm.close()
            running = converted_gguf(path, target, settings) if target is not None else path
            llm = open_gguf(running, threads, amx)
            # mapped already: the file can go (unless the AMX kernels run it: it is loaded again to leave them)
            if running != path and not settings.cache_checkpoints and not amx:
                shutil.rmtree(running.parent, ignore_errors=True)
        backend = cls(llm, settings)
        backend.amx = amx
        backend.path = running
        if backend.flash_attention is None:  # auto: measured on this machine, with these weights
            backend.flash_attention = flash_attention_verdict(backend, settings)
        log.info(
            "loaded %s (GGUF, llama.cpp, weights %s, AMX kernels %s, flash attention %s, %d threads) in %.1fs",
            name,
            target or "as in the file",
            "on" if amx else "off",
            {True: "on", False: "off", None: "llama.cpp's choice"}[backend.flash_attention],
            threads,
            time.perf_counter() - started,
        )
        return backend

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, KVCacheFull)

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        """One call: every row in a stream of its own at once (KVCacheFull when they do not all fit)."""
        self._leave_amx_beside_torch()
        self.lora = self._lora_for(rows)
        self._context_for(rows)
        done: dict[int, Generated] = {}
        for finished in self._run(rows, refill=False):
            done.update(finished)
        return [done[number] for number in range(len(rows))]

    def generate_stream(self, rows: Sequence[Row]) -> Iterator[list[tuple[int, Generated]]]:
        """Continuous batching: rows take KV streams as they free up, and each step yields the rows
        that finished in it, as (index in `rows`, result).

        The first rows (in the order given: the pipeline sorts them by length) set the streams' length,
        as many as the token budget holds; a row that finishes gives its stream to the next waiting row
        that fits it, so a decode step keeps as many rows as there are streams while rows wait, instead
        of running down to the longest row of a call. Rows too long for the streams wait until the
        running ones are done; the context is then remade with longer streams."""
        self._leave_amx_beside_torch()
        self.lora = self._lora_for(rows)
        return self._run(rows, refill=True)

    def _lora_for(self, rows: Sequence[Row]) -> Any:
        """The LoRA the rows run with, loaded (None: none). llama.cpp applies LoRAs to a whole context, so
        a call's rows must share theirs (the pipeline groups them so)."""
        specs = {row.adapter.ref: row.adapter for row in rows if row.adapter is not None and row.adapter.lora}
        if not specs:
            return None
        if len(specs) > 1 or any(row.adapter is None or not row.adapter.lora for row in rows):
            raise ValueError("the rows of one call must share their LoRA adapter")
        (spec,) = specs.values()
        if LORA not in self.adapter_methods:
            raise ValueError(
                f"adapter {spec.ref} is a LoRA; the llama.cpp backend runs LoRAs of llama-architecture models "
                f"(this one is {self.architecture or 'of no stated architecture'})"
            )
        return kept(self.loras, spec.ref, lambda: self._load_lora(spec), LORA_CAPACITY, self._free_lora)

    def _load_lora(self, spec: AdapterSpec) -> Any:
        """A PEFT LoRA converted to llama.cpp's LoRA format (a temporary GGUF file) and loaded onto the model."""
        metadata = self.llm.metadata
        heads = int(metadata[f"{self.architecture}.attention.head_count"])
        kv_heads = int(metadata.get(f"{self.architecture}.attention.head_count_kv", heads))
        alpha, tensors = lora_tensors(Path(spec.path), spec.ref, heads, kv_heads)
        with tempfile.TemporaryDirectory(prefix="sumfleet-lora-") as folder:
            path = Path(folder) / "lora.gguf"
            write_lora_gguf(path, self.architecture, alpha, tensors)
            adapter = self.llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:  # llama.cpp logs why (a tensor whose shape does not fit the model's, say)
            raise ValueError(f"adapter {spec.ref}: llama.cpp could not load its LoRA (tuned for another model?)")
        log.info("adapter %s: LoRA of %d tensors loaded into llama.cpp", spec.ref, len(tensors) // 2)
        return adapter

    def _free_lora(self, adapter: Any) -> None:
        if self.lora is adapter:
            self.lora = None
        if self.ctx is not None:
            self.llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
        self.llama_cpp.llama_adapter_lora_free(adapter)

    def _apply_lora(self) -> None:
        """The context runs the current rows' LoRA, or none (llama.cpp changes it only if it differs)."""
        if self.ctx is None:
            return
        if self.lora is None:
            self.llama_cpp.llama_set_adapters_lora(self.ctx, None, 0, None)
            return
        adapters = (self.llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.lora)
        scales = (ctypes.c_float * 1)(1.0)
        if self.llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
            raise RuntimeError("llama.cpp could not set the LoRA on its context")

    def _leave_amx_beside_torch(self) -> None:
        """Load the weights again off the AMX kernels if torch has come into this process since.

        llama.cpp configures a thread's AMX tiles once (a thread-local flag); torch's oneDNN releases
        the tiles after its own AMX products on the thread that called it, so the next llama.cpp call on
        that thread died of an illegal instruction (tiles used unconfigured): seen in a process that ran
        a bf16 torch model between two llama.cpp calls. Computing in a thread of llama.cpp's own would
        avoid it, but llama.cpp's OpenMP ran 6x slower there (a decoding step 48 ms against 8). A worker
        or `sumfleet run` on llama.cpp never loads torch; a process that does runs the plain kernels."""
        if not self.amx or "torch" not in sys.modules or self.path is None:
            return
        log.warning("torch was loaded into this process: the llama.cpp model leaves its AMX kernels (reloaded)")
        if self.ctx is not None:
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = self.memory = None
            self.shape = (0, 0)
        old = self.llm
        self.loras.clear()  # llama.cpp frees a model's LoRAs with it
        self.lora = None
        self.llm = open_gguf(self.path, self.threads, amx=False)
        self.model = self.llm._model.model
        self.vocab = self.llama_cpp.llama_model_get_vocab(self.model)
        assert isinstance(self.tokenizer, LlamaCppTokenizer)
        self.tokenizer.llm = self.llm
        old.close()
        self.amx = False

    def _run(self, rows: Sequence[Row], refill: bool) -> Iterator[list[tuple[int, Generated]]]:
        """Rows through the context's streams, step by step; finished rows leave after each step.

        Running rows always hold the streams 0..n-1: llama.cpp reads a step's rows in one matrix
        product only where their stream numbers follow one another (a step of 7 rows in streams 0-5
        and 7 took 67.5 ms against 50.6 ms for 8 rows in 0-7, 2 AVX2 cores), so a finished row's stream
        is given to the row in the last stream (a whole-stream copy at the next decode, as llama.cpp
        copies across streams)."""
        llama_cpp = self.llama_cpp
        waiting = list(range(len(rows)))
        running: list[_Running] = []  # position = KV stream
        batch = llama_cpp.llama_batch_init(max(PREFILL_TOKENS, len(rows)), 0, 1)
        try:
            if not refill:  # the caller made the context for all of them
                llama_cpp.llama_memory_clear(self.memory, True)
            self._apply_lora()
            while waiting or running:
                if not running and refill:
                    self._phase(rows, waiting)
                admitted = self._admit(rows, waiting, len(running))
                if admitted:
                    new = [_Running(number, time.perf_counter()) for number in admitted]
                    entries = [(len(running) + slot, rows[number]) for slot, number in enumerate(admitted)]
                    shared = self._share_prefix(batch, [row for _, row in entries]) if not running else 0
                    if not shared:  # each row's soft prompt (if any) into its stream; shared, it is in them
                        self._read_soft_prompts(entries)
                    sampled = self._prefill(batch, entries, shared)
                    for slot, state in enumerate(new):
                        state.outputs.append(sampled[len(running) + slot])
                    running.extend(new)
                finished = self._retire(rows, running)
                if running:
                    batch.n_tokens = 0
                    indexes = [
                        self._add(batch, state.outputs[-1], self._position(rows, state), stream, True)
                        for stream, state in enumerate(running)
                    ]
                    self._decode(batch)
                    for state, index in zip(running, indexes, strict=True):
                        state.outputs.append(self._sample(index, rows[state.number].temperature))
                    finished += self._retire(rows, running)
                if finished:
                    yield finished
        finally:
            llama_cpp.llama_batch_free(batch)

    @staticmethod
    def _position(rows: Sequence[Row], state: _Running) -> int:
        """Where a running row's last sampled token goes: after its soft prompt, prompt and earlier tokens."""
        return rows[state.number].positions + len(state.outputs) - 1

    def _phase(self, rows: Sequence[Row], waiting: list[int]) -> None:
        """A context whose streams fit the next rows: as many of them, in order, as the budget holds."""
        pack: list[Row] = []
        longest = 0
        for number in waiting:
            row = rows[number]
            longest = max(longest, row.positions + row.max_new_tokens)
            if pack and (
                len(pack) == self.max_batch_size
                or batch_cost(longest, 0, len(pack) + 1, STREAM_ALIGN) > self.token_budget
            ):
                break
            pack.append(row)
        self._context_for(pack)
        self.llama_cpp.llama_memory_clear(self.memory, True)

    def _admit(self, rows: Sequence[Row], waiting: list[int], busy: int) -> list[int]:
        """Waiting rows that fit a free stream, in order, taken off `waiting`."""
        sequences, cells = self.shape
        admitted = [n for n in waiting if rows[n].positions + rows[n].max_new_tokens <= cells][: sequences - busy]
        for number in admitted:
            waiting.remove(number)
        return admitted

    def _retire(self, rows: Sequence[Row], running: list[_Running]) -> list[tuple[int, Generated]]:
        """Take finished rows out of `running` (a row stops at an end-of-generation token, kept as its
        last, or at its limit), moving the last streams' rows into the streams they leave."""
        done = [
            state
            for state in running
            if state.outputs[-1] in self.end or len(state.outputs) >= rows[state.number].max_new_tokens
        ]
        if not done:
            return []
        now = time.perf_counter()
        keep = len(running) - len(done)
        holes = [stream for stream in range(keep) if running[stream] in done]
        movers = [stream for stream in range(keep, len(running)) if running[stream] not in done]
        for hole, mover in zip(holes, movers, strict=True):
            self.llama_cpp.llama_memory_seq_cp(self.memory, mover, hole, -1, -1)
            running[hole] = running[mover]
        for stream in range(keep, len(running)):
            self.llama_cpp.llama_memory_seq_rm(self.memory, stream, -1, -1)
        del running[keep:]
        return [
            (
                state.number,
                Generated(
                    state.outputs,
                    now - state.began,
                    finish_reason=finish_reason(state.outputs, rows[state.number].max_new_tokens, self.end),
                ),
            )
            for state in done
        ]

    def _context_for(self, rows: Sequence[Row]) -> None:
        """A context with a KV stream of its own for each row, each as long as the call's longest row.

        Streams, not one cache shared by all rows: in a shared cache every token attends over every
        row's cells (masked), so attention grew with the whole call; 16 BBC articles ran at 0.435
        docs/s shared against 0.697 in streams (8 rows). A context is remade (100-140 ms) only when a
        call needs more streams or longer ones than the one it has; it holds the pipeline's token
        budget, so calls of many short rows and calls of few long ones both fit without a new one."""
        llama_cpp = self.llama_cpp
        longest = max(row.positions + row.max_new_tokens for row in rows)
        stream = batch_cost(longest, 0, 1, STREAM_ALIGN)
        need = stream * len(rows)  # the pipeline's cost of the call, as it packs them: one row may pass the budget
        if len(rows) > 1 and (need > self.token_budget or len(rows) > self.max_batch_size):
            raise KVCacheFull(
                f"{len(rows)} rows of up to {longest} tokens need {need} KV cells; the budget is {self.token_budget}"
            )
        if self.ctx is not None and self.shape[0] >= len(rows) and self.shape[1] >= longest:
            return
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = self.memory = None
        sequences = max(len(rows), min(self.max_batch_size, self.token_budget // stream))
        sequences = min(sequences, int(llama_cpp.llama_max_parallel_sequences()))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * stream
        params.n_batch = PREFILL_TOKENS
        params.n_ubatch = UBATCH_TOKENS[self.flash_attention is not False]
        params.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[self.flash_attention]
        params.n_seq_max = sequences
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise KVCacheFull(f"llama.cpp could not make a context of {sequences} x {stream} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.shape = (sequences, int(llama_cpp.llama_n_ctx(self.ctx)) // sequences)
        self._apply_lora()

    def time_attention(self, on: bool, prompts: Sequence[Sequence[int]], new_tokens: int) -> float:
        """Seconds one call of `prompts` takes with flash attention `on` or off, each row decoding
        `new_tokens` (end-of-generation tokens do not stop it), in KV streams as long as the pipeline makes
        them for a summary's rows (3 x 256 cells, where the budget holds as many rows)."""
        if self.ctx is not None:
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = self.memory = None
        self.flash_attention = on
        longest = max(len(p) for p in prompts) + new_tokens
        cells = max(longest, min(3 * STREAM_ALIGN, self.token_budget // len(prompts)))
        self._context_for([Row(list(p), cells - len(p)) for p in prompts])  # generate() keeps this context
        end, self.end = self.end, frozenset()
        try:
            started = time.perf_counter()
            self.generate([Row(list(p), new_tokens) for p in prompts])
            return time.perf_counter() - started
        finally:
            self.end = end
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = self.memory = None
            self.shape = (0, 0)

    def _share_prefix(self, batch: Any, rows: Sequence[Row]) -> int:
        """Read the tokens every row's prompt starts with once, and copy them into every row's stream.

        A call's prompts share the chat template's opening and the instruction (36 tokens of the
        BBC bench's 477 on average with SmolLM2's template). The prefix is read into the first row's
        stream; llama.cpp copies that stream into each other row's (a buffer copy, done at the next
        decode, about 23 KB per cell for SmolLM2-135M) instead of computing the same keys and values
        again. Each row keeps at least its last prompt token to read itself, where its first token's
        logits come from. Rows with a soft prompt share only where all have the same one (read first,
        into the same streams). Returns the number of prompt tokens shared (0: none, each row reads its
        soft prompt and its whole prompt)."""
        if len(rows) < 2 or not self.share_prefix or len({_soft_ref(row) for row in rows}) > 1:
            return 0
        first = rows[0].ids
        shared = min(len(row.ids) for row in rows) - 1
        for row in rows[1:]:
            same = 0
            while same < shared and row.ids[same] == first[same]:
                same += 1
            shared = same
        if shared < MIN_SHARED_PREFIX:
            return 0
        self._read_soft_prompts([(0, rows[0])])
        offset = rows[0].soft_tokens
        for start in range(0, shared, PREFILL_TOKENS):
            batch.n_tokens = 0
            for position in range(start, min(shared, start + PREFILL_TOKENS)):
                self._add(batch, first[position], offset + position, 0, False)
            self._decode(batch)
        for number in range(1, len(rows)):  # whole streams: llama.cpp copies across streams only so
            self.llama_cpp.llama_memory_seq_cp(self.memory, 0, number, -1, -1)
        self.prompt_tokens_shared += shared * (len(rows) - 1)
        return shared

    def _prefill(self, batch: Any, entries: Sequence[tuple[int, Row]], start: int = 0) -> dict[int, int]:
        """Read each (stream, row)'s prompt from token `start` on (its soft prompt and the tokens before are in
        its stream already), in decode calls of at most PREFILL_TOKENS, and sample each row's first token right after
        the call that read its prompt's end (later calls overwrite logits). Returns the tokens by stream."""
        sampled: dict[int, int] = {}
        ends: dict[int, tuple[int, float]] = {}  # streams whose prompt ends in the batch being filled

        def flush() -> None:
            self._decode(batch)
            for stream, (index, temperature) in ends.items():
                sampled[stream] = self._sample(index, temperature)
            ends.clear()
            batch.n_tokens = 0

        batch.n_tokens = 0
        for stream, row in entries:
            for position in range(start, len(row.ids)):
                if batch.n_tokens == PREFILL_TOKENS:
                    flush()
                final = position == len(row.ids) - 1
                index = self._add(batch, row.ids[position], row.soft_tokens + position, stream, final)
                if final:
                    ends[stream] = (index, row.temperature)
        if batch.n_tokens:
            flush()
        return sampled

    def _read_soft_prompts(self, entries: Sequence[tuple[int, Row]]) -> None:
        """Read each (stream, row)'s soft prompt, if it has one, into its stream at positions 0.. (its prompt
        follows them): llama.cpp takes the vectors as input embeddings, in decode calls of their own (a
        call holds either tokens or embeddings)."""
        vectors = [(stream, self.soft_prompt(row.adapter)) for stream, row in entries if row.soft_tokens]
        if not vectors:
            return
        llama_cpp = self.llama_cpp
        size = min(PREFILL_TOKENS, sum(len(v) for _, v in vectors))
        batch = llama_cpp.llama_batch_init(size, self.width, 1)
        try:
            inputs = np.ctypeslib.as_array(batch.embd, shape=(size, self.width))
            batch.n_tokens = 0
            for stream, soft in vectors:
                for position, vector in enumerate(soft):
                    if batch.n_tokens == size:
                        self._decode(batch)
                        batch.n_tokens = 0
                    index = batch.n_tokens
                    inputs[index] = vector
                    batch.pos[index] = position
                    batch.n_seq_id[index] = 1
                    batch.seq_id[index][0] = stream
                    batch.logits[index] = False
                    batch.n_tokens = index + 1
            if batch.n_tokens:
                self._decode(batch)
        finally:
            llama_cpp.llama_batch_free(batch)

    def soft_prompt(self, spec: AdapterSpec | None) -> np.ndarray:
        """An adapter's soft prompt as float32 vectors [its virtual tokens, the model's width], read from its
        folder once (the last SOFT_PROMPT_CAPACITY used are kept)."""
        assert spec is not None

        def load() -> np.ndarray:
            vectors = read_soft_prompt(Path(spec.path), spec.ref)
            spec.check_soft_prompt(vectors.shape, self.width)
            return vectors

        return kept(self.soft_prompts, spec.ref, load, SOFT_PROMPT_CAPACITY)

    @staticmethod
    def _add(batch: Any, token: int, position: int, sequence: int, logits: bool) -> int:
        index = batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        return index

    def _decode(self, batch: Any) -> None:
        code = self.llama_cpp.llama_decode(self.ctx, batch)
        if code == 1:  # no KV slot for the batch
            raise KVCacheFull("llama.cpp found no room in the KV cache")
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code}")

    def _sample(self, index: int, temperature: float) -> int:
        pointer = self.llama_cpp.llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        if temperature <= 0:
            return int(logits.argmax())
        scaled = logits.astype(np.float64) / temperature
        weights = np.exp(scaled - scaled.max())
        return int(self.rng.choice(self.n_vocab, p=weights / weights.sum()))


def _soft_ref(row: Row) -> str:
    return row.adapter.ref if row.soft_tokens and row.adapter is not None else ""


def open_gguf(path: Path, threads: int, amx: bool = False) -> Any:
    """`llama_cpp.Llama` on a GGUF file; llama.cpp's AMX kernels, where they are built in, only with `amx`.

    The wrapper's own context is tiny: generation runs in the batched context `_context_for` makes."""
    import llama_cpp

    with contextlib.nullcontext() if amx else without_amx_buffers():
        return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=threads, verbose=False)


def ggml_cpu_library() -> Path | None:
    """The file of ggml's CPU backend that llama-cpp-python loads (where its AMX kernels are)."""
    import llama_cpp

    folder = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    found = sorted(p.resolve() for p in folder.glob("libggml-cpu*") if p.is_file())
    return found[0] if found else None


def amx_sound(path: Path, settings: Settings) -> bool:
    """llama.cpp's AMX kernels ran without faulting in a child process that read a prompt of `path`'s
    weights (a quantized GGUF) through them. The verdict is kept per build of ggml's CPU library (by its
    content): in this process, and under `<cache>/llamacpp/` when SUMFLEET_CACHE_CHECKPOINTS is on.

    Why: GCC 12's `_tile_loadconfig` tells the compiler it reads 8 of the tile configuration's 64 bytes,
    so an optimized build drops the stores of the tiles' rows and columns and `ldtilecfg` faults
    (general protection: the process dies at the first prompt). scripts/install.sh builds llama.cpp
    with `-fno-dse -fno-tree-dse`, which keeps them; a build made otherwise may be faulty."""
    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    on_disk = settings.cache_checkpoints and ggml_cpu_library() is not None
    key = _library_key(settings, cache)
    if key in _amx_verdicts:
        return _amx_verdicts[key]
    marker = cache / "llamacpp" / f"amx-{key}" if on_disk else None
    if marker is not None and marker.is_file():
        _amx_verdicts[key] = sound = marker.read_text().strip() == "sound"
        return sound
    started = time.perf_counter()
    try:
        child = subprocess.run(
            [sys.executable, "-c", AMX_PROBE, str(path)], capture_output=True, timeout=300, check=False
        )
        sound = child.returncode == 0 and child.stdout.strip().endswith(b"sound")
        outcome = f"exit status {child.returncode}"
    except subprocess.TimeoutExpired:
        sound, outcome = False, "no answer in 300 s"
    if sound:
        log.info("llama.cpp's AMX kernels ran in a test process (%.1fs): using them", time.perf_counter() - started)
    else:
        log.warning(
            "llama.cpp's AMX kernels failed in a test process (%s): running without them; a llama-cpp-python "
            "built by GCC 12 needs CMAKE_ARGS=\"-DCMAKE_CXX_FLAGS='-fno-dse -fno-tree-dse'\" (scripts/install.sh "
            "sets it; README: Engines)",
            outcome,
        )
    _amx_verdicts[key] = sound
    if marker is not None:
        _write_marker(marker, "sound\n" if sound else f"faulty: {outcome}\n")
    return sound


def _library_key(settings: Settings, cache: Path) -> str:
    """ggml's CPU library, as verdicts about its kernels are keyed: its content's digest where verdicts
    are kept on disk (a rebuilt library is judged afresh), its path otherwise."""
    library = ggml_cpu_library()
    return content_digest(library, cache) if library is not None and settings.cache_checkpoints else str(library)


def _write_marker(marker: Path, text: str) -> None:
    """A verdict kept on disk, written whole or not at all (processes may write the same one)."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    scratch = marker.with_name(f".{marker.name}-{os.getpid()}")
    scratch.write_text(text)
    scratch.replace(marker)


def amx_built() -> bool:
    """The loaded llama.cpp was compiled with its AMX int8 kernels (a native build on an AMX CPU)."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@contextlib.contextmanager
def without_amx_buffers() -> Iterator[None]:
    """Models loaded inside keep their weights out of llama.cpp's extra buffer types when the build has
    AMX kernels: there the AMX buffer holds the quantized weights (Q4_1, q8_0, q4_0; f16 files' q8_0
    embedding table), and in a build by GCC 12 its matrix product faults (general protection at
    `ldtilecfg` in `ggml_backend_amx_mul_mat`: the compiler dropped the stores of the tile
    configuration, see `amx_sound`), killing the process at the first prompt. llama-cpp-python's
    `Llama` takes the model parameters from `llama_model_default_params()` and exposes no
    `use_extra_bufts`, so the defaults are switched for the load. Off, those weights run llama.cpp's
    plain CPU kernels."""
    import llama_cpp.llama_cpp as native

    if not amx_built():
        yield
        return
    made = native.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = made()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        native.llama_model_default_params = made


def flash_attention(choice: str) -> bool | None:
    """SUMFLEET_LLAMACPP_FLASH_ATTENTION as set: True (on), False (off), or None for `auto`, which the
    backend settles at load by measuring both ways (`flash_attention_verdict`). Measured 2026-12-07 through
    the engine (24 BBC articles, 2 cores): on a Xeon with AVX-512 BF16 and AMX, off was 1.39x faster on the
    AMX kernels and 1.21x in f16 (a decoding step of 8 rows 26.6 ms against 56.7); on an AMD EPYC with
    AVX-512 BF16 and no AMX, on was 1.24x faster (f16). No CPU flag tells the two apart."""
    if choice != "auto":
        return choice == "on"
    return None


def measure_flash_attention(backend: LlamaCppBackend) -> dict[bool, float]:
    """Seconds a call of FLASH_PROBE_ROWS rows (FLASH_PROBE_PROMPT prompt tokens each, FLASH_PROBE_NEW new
    tokens) takes with flash attention on (True) and off (False), through the backend's own `generate`,
    each way twice in the order on, off, off, on (a machine that speeds up or slows down meanwhile touches
    both alike), after a short call that brings the weights into memory."""
    vocabulary = [i for i in range(min(backend.n_vocab, 32_000)) if i not in backend.end]
    prompts = [
        [vocabulary[(7919 * (n + 1000 * row)) % len(vocabulary)] for n in range(FLASH_PROBE_PROMPT)]
        for row in range(FLASH_PROBE_ROWS)
    ]
    backend.time_attention(True, [prompt[:32] for prompt in prompts], 2)  # the weights' pages: not counted
    spent = {True: 0.0, False: 0.0}
    for on in (True, False, False, True):
        spent[on] += backend.time_attention(on, prompts, FLASH_PROBE_NEW) / 2
    return spent


def flash_attention_verdict(backend: LlamaCppBackend, settings: Settings) -> bool | None:
    """Flash attention on or off, whichever `measure_flash_attention` found faster on this machine for this
    model file and llama.cpp build (3-8 s on 2 cores, once: the verdict is kept in this process and, with
    SUMFLEET_CACHE_CHECKPOINTS on, under `<cache>/llamacpp/`)."""
    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    running = backend.path
    facts = [
        cpu_model(),
        " ".join(sorted(cpu_flags())),
        str(backend.threads),
        str(backend.amx),
        _library_key(settings, cache),
        f"{running.name}:{running.stat().st_size}" if running is not None else "",
    ]
    key = hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]
    if key in _flash_verdicts:
        return _flash_verdicts[key]
    marker = cache / "llamacpp" / f"flash-attention-{key}" if settings.cache_checkpoints else None
    kept = marker.read_text().split()[:1] if marker is not None and marker.is_file() else []
    if kept in (["on"], ["off"]):
        _flash_verdicts[key] = on = kept == ["on"]
        return on
    started = time.perf_counter()
    try:
        spent = measure_flash_attention(backend)
    except Exception as error:  # a budget too small for the probe's streams, say: llama.cpp's own choice
        log.warning("could not measure llama.cpp's flash attention (%s): leaving it to llama.cpp", error)
        return None
    on = spent[True] < spent[False]
    log.info(
        "llama.cpp flash attention measured (%.1fs): a call %.3fs with it, %.3fs without: %s",
        time.perf_counter() - started,
        spent[True],
        spent[False],
        "on" if on else "off",
    )
    _flash_verdicts[key] = on
    if marker is not None:
        _write_marker(marker, f"{'on' if on else 'off'} {spent[True]:.4f} {spent[False]:.4f}\n")
    return on


def fast_f16_cpu() -> bool:
    """llama.cpp multiplies f16 weights with fast kernels here: x86 with AVX2 and F16C, or ARM."""
    return {"avx2", "f16c"} <= cpu_flags() or platform.machine().lower() in ("aarch64", "arm64")


def weight_type(choice: str, file_type: int, parameters: int, amx: bool = False) -> str | None:
    """The GGUF type to convert the model's weights to before running them, or None to run the file as it is.

    `choice` is SUMFLEET_LLAMACPP_WEIGHTS; `file_type` the file's general.file_type (LLAMA_FTYPE_*); `amx`:
    llama.cpp's AMX kernels run this file's weights (Q4_0, Q4_1, Q8_0), faster than any conversion."""
    if choice == "as-is":
        return None
    if choice != "auto":
        return None if FILE_TYPES[choice] == file_type else choice
    if amx and file_type in AMX_FILE_TYPES:
        return None
    if file_type == Q4_1 and parameters <= CONVERT_UP_TO_PARAMETERS:
        if bf16_kernels():
            return "bf16"
        if fast_f16_cpu():
            return "f16"
    return None


def bf16_kernels() -> bool:
    """llama.cpp multiplies bf16 weights natively here: the CPU has AVX-512 BF16 and llama.cpp was built
    with it. Measured 2026-12-07 on an AMD EPYC with AVX-512 BF16 (2 cores, 24 BBC articles through the
    engine, two rounds): bf16 weights 1.076 / 1.164 docs/s against f16's 0.828 / 0.850, the same 476 MiB."""
    if "avx512_bf16" not in cpu_flags():
        return False
    try:
        import llama_cpp
    except ImportError:
        return False
    return "AVX512_BF16 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def converted_gguf(path: Path, target: str, settings: Settings) -> Path:
    """`path` re-written in the GGUF type `target` by llama.cpp's quantizer (de-quantized first where
    the file is quantized; f16 and bf16 with the token embedding table in q8_0), cached under the
    cache folder keyed by the file's content; with SUMFLEET_CACHE_CHECKPOINTS off, written to a
    temporary folder instead (the caller removes it)."""
    import llama_cpp

    kind = f"{target}-embed-q8_0" if target in SMALL_EMBEDDINGS else target
    if settings.cache_checkpoints:
        cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
        folder = cache / "gguf"
        name = f"{path.stem}-{content_digest(path, cache)}-{kind}-llamacpp{llama_cpp.__version__}.gguf"
        if (folder / name).is_file():
            return folder / name
    else:
        folder = Path(tempfile.mkdtemp(prefix="sumfleet-gguf-"))
        name = f"{path.stem}-{kind}.gguf"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scratch = folder / f".writing-{os.getpid()}-{name}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[target]
    params.allow_requantize = True
    if target in SMALL_EMBEDDINGS:
        params.token_embedding_type = GGML_TYPE_Q8_0
    params.nthread = len(os.sched_getaffinity(0))
    code = llama_cpp.llama_model_quantize(str(path).encode(), str(scratch).encode(), ctypes.byref(params))
    if code != 0:
        scratch.unlink(missing_ok=True)
        raise ConfigError(f"llama.cpp could not convert {path.name} to {target} in {folder} (code {code})")
    scratch.replace(folder / name)  # whole or not at all; a second process writing the same file is harmless
    log.info("converted %s to %s in %.1fs: %s", path.name, target, time.perf_counter() - started, folder / name)
    return folder / name
