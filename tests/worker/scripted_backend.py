"""A backend whose output each document scripts: the words after `OUTPUT:` in the document, each
written backwards there ("OUTPUT: ehT yrref si kcab." answers "The ferry is back."), so that the
answer is not a copy of the document (which the `echo` check would flag) unless a test means it.

For tests of what happens to an output after generation (finish reasons, trimming, quality
warnings), through the real pipeline, a real worker and `sumfleet run`:
`python:tests.worker.scripted_backend:factory`. Like a model, it stops at the row's token limit or
after its script with an end-of-sequence token; it does not say why it stopped (`Generated` without
a finish reason), so the pipeline works that out from the tokens, as for any plugin backend.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from models.settings import Settings
from tests.worker.toy_backend import EOS, ToyBackend, WordTokenizer
from worker.backends.base import Generated, Row, Tokenizer

MARK = "OUTPUT"


class SpacedTokenizer(WordTokenizer):
    """The toy word tokenizer, decoding punctuation without a space before it ("voted." not "voted .")."""

    def decode(self, ids: Sequence[int]) -> str:
        return re.sub(r" ([.,;:!?])", r"\1", super().decode(ids))


class ScriptedBackend(ToyBackend):
    def __init__(self) -> None:
        super().__init__(context_length=4096)
        self.tokenizer: Tokenizer = SpacedTokenizer()
        self.mark = self.tokenizer.encode(f"{MARK}:")

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        self.calls.append(list(rows))
        started = time.perf_counter()
        out = []
        for row in rows:
            script = self._script(row.ids)
            tokens = script[: row.max_new_tokens]
            out.append(tokens + [EOS] * (len(tokens) < row.max_new_tokens))
        return [Generated(tokens, time.perf_counter() - started) for tokens in out]

    def _script(self, ids: list[int]) -> list[int]:
        """The words after the last `OUTPUT:` of the prompt, up to the chat template's closing
        `[assistant]`, turned the right way round."""
        width = len(self.mark)
        starts = [i + width for i in range(len(ids) - width + 1) if ids[i : i + width] == self.mark]
        if not starts:
            return []
        written = ids[starts[-1] : len(ids) - 3]  # the prompt ends with "[", "assistant", "]"
        tokenizer = self.tokenizer
        assert isinstance(tokenizer, SpacedTokenizer)
        return [tokenizer.encode(tokenizer.words[token][::-1])[0] for token in written]


def backwards(text: str) -> str:
    """How a document writes the answer `text` after `OUTPUT:` (each word backwards, punctuation kept)."""
    return " ".join(word[::-1] for word in re.findall(r"\w+|[^\w\s]", text))


def factory(name: str, settings: Settings) -> ScriptedBackend:
    """The plugin entry point: `python:tests.worker.scripted_backend:factory`."""
    return ScriptedBackend()
