"""The llama.cpp backend (`llama-cpp-python`): a GGUF file run as it is, with its quantized kernels.

Nothing is de-quantized: the bundled Q4_1 SmolLM2 keeps its 98 MB of weights in memory. Rows
of a call decode together, one sequence each in a shared KV cache (`n_ctx` cells, the token
budget): the prompts are read in one pass, then every step adds one token for each row still
going, so each decode step is one matrix product for all rows. Each row stops at its own limit
or an end-of-generation token. The chat template comes from the GGUF's metadata, rendered like
transformers renders it (a sandboxed Jinja environment), so prompts match token for token.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import defaults
from models.errors import ConfigError
from models.model_names import ModelSource
from models.settings import Settings
from worker.backends.base import Generated, Row, Tokenizer, finish_reason

log = logging.getLogger(__name__)

TOKEN_BUDGET = 8192  # KV cells shared by a call's rows (about 23 KB each for SmolLM2-135M: 190 MB)
MAX_BATCH_SIZE = 16  # sequences decoded together
PREFILL_TOKENS = 2048  # prompt tokens per llama_decode call (n_batch)


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
        self.supports_adapters = False
        self.max_batch_size = settings.max_batch_size or MAX_BATCH_SIZE
        self.token_budget = settings.token_budget or TOKEN_BUDGET
        threads = settings.threads or len(os.sched_getaffinity(0))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.token_budget
        params.n_batch = PREFILL_TOKENS
        params.n_ubatch = 512
        params.n_seq_max = min(self.max_batch_size, int(llama_cpp.llama_max_parallel_sequences()))
        params.kv_unified = True  # one cache for all rows: a long prompt may use what short ones leave
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise ConfigError(f"llama.cpp could not make a context of {self.token_budget} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.rng = np.random.default_rng()

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
        # the wrapper's own context is tiny: generation runs in the batched context made above
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=threads, verbose=False)
        backend = cls(llm, settings)
        log.info("loaded %s (GGUF, llama.cpp, %d threads) in %.1fs", name, threads, time.perf_counter() - started)
        return backend

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, KVCacheFull)

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        llama_cpp = self.llama_cpp
        need = sum(len(row.ids) + row.max_new_tokens for row in rows)
        if need > self.token_budget or len(rows) > self.max_batch_size:
            raise KVCacheFull(f"{len(rows)} rows need {need} KV cells; the cache holds {self.token_budget}")
        started = time.perf_counter()
        llama_cpp.llama_memory_clear(self.memory, True)
        batch = llama_cpp.llama_batch_init(max(PREFILL_TOKENS, len(rows)), 0, 1)
        outputs: list[list[int]] = [[] for _ in rows]
        try:
            sampled = self._prefill(batch, rows)
            while sampled:
                going: dict[int, int] = {}  # rows that go on, and the token each feeds back
                for number, token in sampled.items():
                    outputs[number].append(token)
                    if token not in self.tokenizer.eos_ids and len(outputs[number]) < rows[number].max_new_tokens:
                        going[number] = token
                if not going:
                    break
                batch.n_tokens = 0
                indexes = {
                    number: self._add(batch, token, len(rows[number].ids) + len(outputs[number]) - 1, number, True)
                    for number, token in going.items()
                }
                self._decode(batch)
                sampled = {number: self._sample(index, rows[number].temperature) for number, index in indexes.items()}
        finally:
            llama_cpp.llama_batch_free(batch)
        seconds = time.perf_counter() - started
        # a row stops at an end-of-generation token (kept as its last token) or at its limit
        return [
            Generated(tokens, seconds, finish_reason=finish_reason(tokens, row.max_new_tokens, self.end))
            for row, tokens in zip(rows, outputs, strict=True)
        ]

    def _prefill(self, batch: Any, rows: Sequence[Row]) -> dict[int, int]:
        """Read every row's prompt (in decode calls of at most PREFILL_TOKENS) and sample each row's
        first token right after the call that read its prompt's end (later calls overwrite logits)."""
        sampled: dict[int, int] = {}
        ends: dict[int, int] = {}  # rows whose prompt ends in the batch being filled: their logits' index

        def flush() -> None:
            self._decode(batch)
            for number, index in ends.items():
                sampled[number] = self._sample(index, rows[number].temperature)
            ends.clear()
            batch.n_tokens = 0

        batch.n_tokens = 0
        for number, row in enumerate(rows):
            for position, token in enumerate(row.ids):
                if batch.n_tokens == PREFILL_TOKENS:
                    flush()
                final = position == len(row.ids) - 1
                index = self._add(batch, token, position, number, final)
                if final:
                    ends[number] = index
        if batch.n_tokens:
            flush()
        return sampled

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
