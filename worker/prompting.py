"""Prompts as a backend's model takes them: token ids through its chat template, fitted to its context.

The usable context depends on how many tokens a row will generate, since a decoder-only
model holds prompt and output in the same positions; it is worked out per row from that
row's own limit, never from a worker-wide setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from models import defaults
from models.prompts import PromptPlan
from models.settings import Settings
from worker.backends.base import Backend


class Prompter:
    """Builds and measures prompts for one backend."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_input_tokens = settings.max_input_tokens  # the operator's cap on prompt tokens, if any
        self._overheads: dict[tuple[str, str], int] = {}

    def room(self, max_new_tokens: int) -> int:
        """Prompt tokens a row may fill when it generates up to `max_new_tokens`.

        The setting (`SUMFLEET_MAX_INPUT_TOKENS`), else the backend's cap for its hardware,
        and never more than the model's own context less the row's output (an encoder-decoder's
        output has positions of its own). Raises `ValueError` when nothing is left.
        """
        own = self.backend.context_length
        cap = self.max_input_tokens or self.backend.input_cap
        if own is None:
            return cap or defaults.MAX_INPUT_TOKENS_FALLBACK
        available = own if self.backend.encoder_decoder else own - max_new_tokens
        if available < defaults.MIN_PROMPT_TOKENS:
            raise ValueError(
                f"{max_new_tokens} new tokens leave {max(available, 0)} of this model's {own} positions "
                f"for the prompt; lower max_new_tokens"
            )
        return min(available, cap) if cap else available

    def content(self, plan: PromptPlan, template: str, language: str, document: str) -> str:
        """The user message for `document`; an encoder-decoder summarizer takes the document bare."""
        return document if self.backend.encoder_decoder else plan.render(template, document, language)

    def wrap(self, content: str) -> list[int]:
        """Token ids of one user message as the model takes it.

        Chat models get their chat template; encoder-decoder models get the text with the
        prefix their config asks for (T5's "summarize: "); other models the plain text.
        """
        if self.backend.encoder_decoder:
            return self.tokenizer.encode(self.backend.input_prefix + content, special_tokens=True)
        templated = self.tokenizer.chat([{"role": "user", "content": content}])
        return self.tokenizer.encode(content if templated is None else templated)

    def fit(self, plan: PromptPlan, template: str, language: str, document: str, room: int) -> list[int]:
        """The prompt's ids, the document cut so that they fit in `room` tokens."""
        ids = self.wrap(self.content(plan, template, language, document))
        if len(ids) <= room:
            return ids
        doc_ids = self.tokenizer.encode(document)
        keep = max(1, len(doc_ids) - (len(ids) - room))
        cut = self.tokenizer.decode(doc_ids[:keep])
        return self.wrap(self.content(plan, template, language, cut))[:room]

    def encode(self, plan: PromptPlan, document: str, max_new_tokens: int) -> tuple[str | None, list[int]]:
        """(variant, prompt token ids) of a whole document, cut to fit (None: no template was used)."""
        variant, template, language = plan.for_document(document)
        ids = self.fit(plan, template, language, document, self.room(max_new_tokens))
        return (None if self.backend.encoder_decoder else variant), ids

    def chat(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        """A job's own chat messages, through the chat template (or joined, for other models)."""
        cleaned = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        if not self.backend.encoder_decoder:
            templated = self.tokenizer.chat(cleaned)
            if templated is not None:
                return self.tokenizer.encode(templated)
        joined = "\n\n".join(m["content"] for m in cleaned)
        return self.wrap(joined) if self.backend.encoder_decoder else self.tokenizer.encode(joined)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts of `texts` (for splitting long documents)."""
        return [len(self.tokenizer.encode(text)) for text in texts]

    def overhead(self, plan: PromptPlan, template: str, language: str) -> int:
        """Tokens a template adds around its document."""
        key = (template, language)
        if key not in self._overheads:
            self._overheads[key] = len(self.wrap(self.content(plan, template, language, "")))
        return self._overheads[key]

    def decode(self, tokens: Sequence[int]) -> tuple[str, int]:
        """(text, tokens used) of a generated row, up to its end-of-sequence token."""
        eos = set(self.tokenizer.eos_ids)
        used = next((position for position, token in enumerate(tokens) if token in eos), len(tokens))
        # a length cut can split a multi-byte character between tokens: drop the stray half
        return self.tokenizer.decode(tokens[:used]).rstrip("\ufffd").strip(), used
