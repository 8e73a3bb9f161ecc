"""A second backend written against the narrow protocol only (`worker.backends.base`), to show that
one module is all a new backend takes: the pipeline tests run against it and the transformers one.

It loads nothing. Its tokenizer numbers words and punctuation as it meets them; its "model"
answers with a slice of the prompt, so outputs depend on the input, never run past a row's
limit, and shrink with it (map-reduce converges). Like a model with learned positions, it fails
with `IndexError` when prompt and output together exceed its context. It can also be loaded as
a plugin model, `python:tests.worker.toy_backend:factory`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from models.settings import Settings
from worker.backends.base import Generated, Row, Tokenizer

EOS = 1


class ToyOutOfMemory(MemoryError):
    """What the toy backend raises for a call that does not fit (as a GPU backend would)."""


class WordTokenizer:
    """Words and punctuation marks as ids, numbered on first sight; 0 pads, 1 ends a sequence."""

    eos_ids = (EOS,)

    def __init__(self, chat_template: bool = True) -> None:
        self.words = ["<pad>", "</s>"]
        self.ids = {word: number for number, word in enumerate(self.words)}
        self.chat_template = chat_template

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        ids = [self._id(word) for word in re.findall(r"\w+|[^\w\s]", text)]
        return [*ids, EOS] if special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in ids if i > EOS)

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        if not self.chat_template:
            return None
        return "".join(f"[{m['role']}] {m['content']} " for m in messages) + "[assistant]"

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]


class ToyBackend:
    """Implements `Backend`: `calls` records the rows of every generate call; `fail(rows)` may
    return an exception to raise for a call (a test's way to make one fail)."""

    def __init__(self, context_length: int = 512, max_batch_size: int = 8, token_budget: int = 4096) -> None:
        self.tokenizer: Tokenizer = WordTokenizer()
        self.context_length: int | None = context_length
        self.input_cap: int | None = None
        self.encoder_decoder = False
        self.input_prefix = ""
        self.max_batch_size = max_batch_size
        self.token_budget = token_budget
        self.packs_itself = False
        self.adapter_methods: frozenset[str] = frozenset()
        self.calls: list[list[Row]] = []
        self.fail: Callable[[Sequence[Row]], BaseException | None] = lambda rows: None

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        self.calls.append(list(rows))
        error = self.fail(rows)
        if error is not None:
            raise error
        started = time.perf_counter()
        out = []
        for row in rows:
            if self.context_length is not None and len(row.ids) + row.max_new_tokens > self.context_length:
                raise IndexError("index out of range in self")
            middle = len(row.ids) // 2
            tokens = [t for t in row.ids[middle:] if t > EOS][: row.max_new_tokens]
            out.append(tokens + [EOS] * (len(tokens) < row.max_new_tokens))
        return [Generated(tokens, time.perf_counter() - started) for tokens in out]

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, ToyOutOfMemory)


def factory(name: str, settings: Settings) -> ToyBackend:
    """The plugin entry point: `python:tests.worker.toy_backend:factory` serves the toy backend."""
    return ToyBackend()


def recording(name: str, settings: Settings) -> ToyBackend:
    """`python:tests.worker.toy_backend:recording`: rows per call up to 32, each call's row count
    appended to the file TOY_BACKEND_CALLS names; while the file TOY_BACKEND_HOLD names exists,
    a call waits (a test's way to hold a worker mid-generation)."""
    backend = ToyBackend(max_batch_size=32, token_budget=1_000_000)
    calls, hold = Path(os.environ["TOY_BACKEND_CALLS"]), os.environ.get("TOY_BACKEND_HOLD")
    real = backend.generate

    def generate(rows: Sequence[Row]) -> list[Generated]:
        with calls.open("a") as handle:
            handle.write(f"{len(rows)}\n")
        while hold and Path(hold).exists():
            time.sleep(0.05)
        return real(rows)

    backend.generate = generate  # type: ignore[method-assign]
    return backend


def troubled(name: str, settings: Settings) -> ToyBackend:
    """`python:tests.worker.toy_backend:troubled`: a document with the word FAIL fails (alone, once
    the pipeline has split its call down to it); a call holding a document with the word OOM and
    others runs out of memory (so the pipeline splits it), while that document alone succeeds."""
    backend = ToyBackend()
    words = backend.tokenizer

    def fail(rows: Sequence[Row]) -> BaseException | None:
        texts = [words.decode(row.ids).split() for row in rows]
        if len(rows) > 1 and any("OOM" in text for text in texts):
            return ToyOutOfMemory("toy out of memory")
        if any("FAIL" in text for text in texts):
            return RuntimeError("toy failure")
        return None

    backend.fail = fail
    return backend


def paced(name: str, settings: Settings) -> ToyBackend:
    """`python:tests.worker.toy_backend:paced`: one row per call; a call holding a document with the
    word SLOW takes a second (a slow machine: progress, but a chunk takes long); one with the word
    HANG never returns (a stuck engine)."""
    backend = ToyBackend(max_batch_size=1)
    words = backend.tokenizer
    real = backend.generate

    def generate(rows: Sequence[Row]) -> list[Generated]:
        texts = [words.decode(row.ids).split() for row in rows]
        if any("HANG" in text for text in texts):
            while True:
                time.sleep(60)
        if any("SLOW" in text for text in texts):
            time.sleep(1.0)
        return real(rows)

    backend.generate = generate  # type: ignore[method-assign]
    return backend
