"""The seam under the generation pipeline: what a backend is asked to do, and nothing more.

A backend holds one loaded model. The pipeline above it (`worker.pipeline`) renders prompts
through the chat template, fits them into the context, runs map-reduce over long documents,
packs rows under a token budget and halves a call that fails; a backend turns rows of token
ids into generated tokens, and says how big its calls may be. A new backend is one module
that implements `Backend` (and a `Tokenizer` for its model).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """A tuned adapter a row runs with: a soft prompt put before its prompt, or a LoRA."""

    ref: str  # name@version, as the batch records it
    method: str  # prompt-tuning or lora
    path: str  # its folder (PEFT's adapter_config.json and adapter_model.safetensors)
    virtual_tokens: int = 0  # positions a soft prompt takes before the prompt

    @property
    def lora(self) -> bool:
        return self.method == "lora"

    def check_soft_prompt(self, shape: Sequence[int], width: int) -> None:
        """Refuse, by name, a soft prompt whose shape is not [its virtual tokens, the model's width]."""
        if len(shape) != 2 or shape[0] != self.virtual_tokens or shape[1] != width:
            raise ValueError(
                f"adapter {self.ref}: its soft prompt is {' x '.join(map(str, shape))}; this model takes "
                f"{self.virtual_tokens} x {width} (tuned for another model?)"
            )


SOFT_PROMPT = "prompt-tuning"  # the adapter methods a backend may run (`Backend.adapter_methods`)
LORA = "lora"


@dataclass(frozen=True, slots=True)
class Row:
    """One prompt of a generate call."""

    ids: list[int]  # the prompt's token ids, as `Tokenizer.encode` gave them
    max_new_tokens: int  # this row stops after this many new tokens (rows of one call may differ)
    temperature: float = 0.0  # 0: greedy; every row of one call has the same temperature
    adapter: AdapterSpec | None = None  # soft prompts may differ per row; a call's rows share one LoRA (or none)

    @property
    def soft_tokens(self) -> int:
        """Positions the row's soft prompt takes before its prompt (0: none)."""
        return self.adapter.virtual_tokens if self.adapter is not None and not self.adapter.lora else 0

    @property
    def positions(self) -> int:
        """Positions the row's input takes: its soft prompt and its prompt."""
        return self.soft_tokens + len(self.ids)


@dataclass(frozen=True, slots=True)
class Generated:
    """What one row produced."""

    tokens: list[int] | None  # new tokens only, at most the row's max_new_tokens; None when it failed
    seconds: float  # wall time of the call that produced it
    error: str | None = None  # why this row alone failed (a backend that reports failures per row)
    # "stop" (the model ended it) or "length" (it reached max_new_tokens); None: the pipeline works it
    # out from the tokens (`finish_reason`), for backends that do not say
    finish_reason: str | None = None


def finish_reason(tokens: Sequence[int], max_new_tokens: int, eos_ids: Collection[int]) -> str:
    """Why a row's generation stopped: `stop` when an end-of-sequence token came within its limit (or it
    stopped short of the limit), `length` when it ran to `max_new_tokens` without one."""
    if any(token in eos_ids for token in tokens[:max_new_tokens]):
        return "stop"
    return "length" if len(tokens) >= max_new_tokens else "stop"


class Tokenizer(Protocol):
    """Text to token ids and back, for the model a backend holds."""

    @property
    def eos_ids(self) -> Sequence[int]:
        """Tokens that end a generated sequence."""
        ...

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `special_tokens` adds what the model wraps every input in (BOS, EOS)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""
        ...

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        """`messages` ({role, content}) through the model's chat template, ending where the
        assistant's answer starts; None when the model has no chat template."""
        ...


class Backend(Protocol):
    """One loaded model that generates tokens for rows of token ids."""

    tokenizer: Tokenizer
    context_length: int | None  # positions the model takes (None: its config does not say)
    input_cap: int | None  # prompt tokens worth using at most on this hardware (CPU: prefill cost), or None
    encoder_decoder: bool  # an encoder-decoder summarizer: the document goes in bare, output has its own positions
    input_prefix: str  # what an encoder-decoder expects before the document (T5: "summarize: ")
    max_batch_size: int  # rows per call when the settings do not say
    token_budget: int  # (longest prompt + max new tokens) x rows per call when the settings do not say
    packs_itself: bool  # it schedules rows itself (continuous batching): hand it all rows at once
    adapter_methods: frozenset[str]  # the adapters it runs in `Row.adapter` (SOFT_PROMPT, LORA), or none
    # Optional, not part of the protocol: `cell_alignment`, when a backend gives each row its KV cells in
    # blocks (llama.cpp: 256); the pipeline then counts a row's (prompt + new tokens) rounded up to it.
    # And `streams_rows` with `generate_stream(rows)`, for a backend that batches continuously: it takes
    # all rows of a round and yields, step by step, the (index, Generated) of the rows that finished.

    def generate(self, rows: Sequence[Row]) -> list[Generated]:
        """One `Generated` per row, in order. Raises when the whole call failed (the pipeline
        then splits the rows in half, down to the failing one)."""
        ...

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether `error` means the call did not fit in memory (the caller then lowers its
        token budget); frees what the failed call left behind."""
        ...
