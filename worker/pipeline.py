"""The generation pipeline: claimed jobs in, outcomes out, over any backend.

Each job becomes generation rows: a chat request as it is, a document through its prompt
template, or, when the prompt does not fit the usable context, the pieces of the document
(map-reduce: the piece summaries are joined and summarized again, level by level). Rows are
sorted by length and packed under a token budget; rows of different token limits share a
call. A call that raises is split in half down to the failing row, which alone fails; out of
memory also lowers the budget for the rest of the chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from models import defaults
from models.claims import ClaimedJob, JobOutcome
from models.prompts import PIECE_TEMPLATES, PromptPlan
from models.quality import warnings_for
from models.settings import Settings
from models.text import trim_to_sentence
from worker.backends.base import Backend, Generated, Row, finish_reason
from worker.batching import batch_cost, take_batch
from worker.engine import GenerationParams
from worker.prompting import Prompter
from worker.splitting import split_document

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Doc:
    """A job on its way through the pipeline: one prompt, or the levels of a long document."""

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
    calls: set[int] = field(default_factory=set)  # generate calls its seconds count (pieces may share one)
    closed: bool = False  # its outcome was handed back
    finish_reason: str | None = None  # of its final row: "stop" (the model ended it) or "length" (the limit)


@dataclass(slots=True)
class _Item:
    """One row of a generate call: a whole document's prompt, a piece's, or a chat request."""

    doc: _Doc
    row: Row
    slot: int = 0  # which piece of the document's level
    final: bool = True  # its text is the document's summary


class GenerationPipeline:
    """An `Engine` over one backend (see the module docstring)."""

    def __init__(self, name: str, backend: Backend, settings: Settings) -> None:
        self.name = name
        self.backend = backend
        self.prompter = Prompter(backend, settings)
        self.max_batch_size = settings.max_batch_size or backend.max_batch_size
        self.configured_budget = settings.token_budget or backend.token_budget
        self.budget = self.configured_budget  # lowered for the rest of a chunk after out-of-memory
        self.align = getattr(backend, "cell_alignment", 1)  # a row's KV cells come in blocks of this many
        self._calls = 0  # backend calls made, numbering them (a document's time counts each call once)

    @property
    def capacity(self) -> int:
        """Jobs a worker should hand over at once: two generate calls' worth, so that calls are full
        and rows are sorted by length across them (a worker takes more chunks below this)."""
        return 2 * self.max_batch_size

    def run(
        self, jobs: Sequence[ClaimedJob], prompt: PromptPlan, params: GenerationParams
    ) -> Iterator[list[JobOutcome]]:
        pending: list[_Item] = []
        failed: list[JobOutcome] = []
        for job in jobs:
            try:
                pending.extend(self._start(job, prompt, params))
            except Exception as error:  # one bad document must not sink its chunk
                failed.append(JobOutcome(job.id, error=f"could not build the prompt: {describe(error)}"))
        if failed:
            yield failed
        self.budget = self.configured_budget
        while pending:  # a round: every row ready now, then the next levels of long documents
            following: list[_Item] = []
            groups: dict[tuple[float, str], list[_Item]] = {}  # one sampling setting and LoRA per call
            for item in pending:
                adapter = item.row.adapter
                lora = adapter.ref if adapter is not None and adapter.lora else ""
                groups.setdefault((item.row.temperature, lora), []).append(item)
            for _, group in sorted(groups.items()):
                group.sort(key=lambda item: item.row.positions)
                for results in self._calls_of(group):
                    outcomes: list[JobOutcome] = []
                    for item, done, call in results:
                        outcome, more = self._advance(item, done, call, prompt, params)
                        if outcome is not None:
                            outcomes.append(outcome)
                        following.extend(more)
                    yield outcomes  # possibly empty: a chance to stop between batches
            pending = following

    # -- rows of a job -----------------------------------------------------------------------

    def _start(self, job: ClaimedJob, prompt: PromptPlan, params: GenerationParams) -> list[_Item]:
        """The first generation rows of a job."""
        if params.adapter is not None and params.adapter.method not in self.backend.adapter_methods:
            runs = ", ".join(sorted(self.backend.adapter_methods)) or "no adapters"
            raise ValueError(
                f"adapter {params.adapter.ref} ({params.adapter.method}) needs a backend that runs "
                f"{params.adapter.method} adapters (SUMFLEET_ENGINE=transformers); this one runs {runs}"
            )
        if job.request is not None:
            limit = min(int(job.request.get("max_new_tokens") or params.max_new_tokens), defaults.MAX_NEW_TOKENS_LIMIT)
            ids = self.prompter.chat(job.request["messages"])
            room = self._room(limit, params)
            if len(ids) > room:
                raise ValueError(f"the request is {len(ids)} tokens, over this model's usable context of {room} tokens")
            temperature = float(job.request.get("temperature") or 0.0)
            return [_Item(_Doc(job, "chat", "", None), Row(ids, limit, temperature, params.adapter))]
        variant, template, language = prompt.for_document(job.text)
        doc = _Doc(job, None if self.backend.encoder_decoder else variant, language, template)
        if params.long_documents == "truncate":
            room = self._room(params.max_new_tokens, params)
            ids = self.prompter.fit(prompt, template, language, job.text, room)
            return [_Item(doc, Row(ids, params.max_new_tokens, adapter=params.adapter))]
        return self._level(doc, job.text, prompt, params)

    def _room(self, max_new_tokens: int, params: GenerationParams) -> int:
        """Prompt tokens a final row may fill: what the context leaves, less a soft prompt's positions."""
        soft = params.adapter.virtual_tokens if params.adapter is not None and not params.adapter.lora else 0
        return self.prompter.room(max_new_tokens + soft)

    def _level(self, doc: _Doc, text: str, prompt: PromptPlan, params: GenerationParams) -> list[_Item]:
        """Rows for `text` at the document's current level: the final prompt if it fits, else its pieces."""
        assert doc.template is not None
        prompter = self.prompter
        room = self._room(params.max_new_tokens, params)
        ids = prompter.wrap(prompter.content(prompt, doc.template, doc.language, text))
        if len(ids) <= room or doc.level >= defaults.MAX_LEVELS:
            if len(ids) > room:
                ids = prompter.fit(prompt, doc.template, doc.language, text, room)
            return [_Item(doc, Row(ids, params.max_new_tokens, adapter=params.adapter))]
        piece_template = PIECE_TEMPLATES.get(doc.language, PIECE_TEMPLATES["en"])
        piece_new = max(params.max_new_tokens, defaults.MAP_NEW_TOKENS)
        piece_room = prompter.room(piece_new)
        overhead = prompter.overhead(prompt, piece_template, doc.language)
        limit = max(32, piece_room - overhead - defaults.PIECE_MARGIN)
        pieces = split_document(text, limit, prompter.count)
        if len(pieces) < 2:  # nothing to split on: cut instead
            ids = prompter.fit(prompt, doc.template, doc.language, text, room)
            return [_Item(doc, Row(ids, params.max_new_tokens, adapter=params.adapter))]
        if doc.level == 1:
            doc.pieces = len(pieces)
        doc.parts = [None] * len(pieces)
        doc.waiting = len(pieces)
        # a piece's summary is at most a third of the piece, so every level shrinks the text
        piece_tokens = max(8, min(piece_new, limit // 3))
        return [
            _Item(
                doc,
                Row(prompter.fit(prompt, piece_template, doc.language, piece, piece_room), piece_tokens),
                slot=slot,
                final=False,
            )
            for slot, piece in enumerate(pieces)
        ]

    def _advance(
        self, item: _Item, done: Generated, call: int, prompt: PromptPlan, params: GenerationParams
    ) -> tuple[JobOutcome | None, list[_Item]]:
        """Take one generated row (of generate call number `call`): the document's outcome when it is
        finished, or its next rows."""
        doc = item.doc
        if doc.closed:  # another piece of it failed already
            return None, []
        if call not in doc.calls:  # pieces of one document in one call: that call's time counts once
            doc.calls.add(call)
            doc.seconds += done.seconds
        doc.prompt_tokens += len(item.row.ids)
        if item.final:
            where = "" if doc.level == 1 else f" (level {doc.level}: the summary of the piece summaries)"
        else:
            where = f" (level {doc.level}, piece {item.slot + 1} of {len(doc.parts)})"
        if done.error is not None or done.tokens is None:
            doc.closed = True
            return JobOutcome(doc.job.id, error=f"generation failed{where}: {done.error}"), []
        text, used = self.prompter.decode(done.tokens)
        doc.output_tokens += used
        if item.final:
            doc.closed = True
            doc.finish_reason = done.finish_reason or finish_reason(
                done.tokens, item.row.max_new_tokens, self.prompter.tokenizer.eos_ids
            )
            return self._outcome(doc, text, prompt, params), []
        doc.parts[item.slot] = text
        doc.waiting -= 1
        if doc.waiting:
            return None, []
        joined = "\n\n".join(part for part in doc.parts if part)
        if not joined:
            doc.closed = True
            return JobOutcome(
                doc.job.id,
                error=f"the model produced empty summaries for all {len(doc.parts)} pieces",
                warnings=["empty"],
            ), []
        doc.level += 1
        try:
            return None, self._level(doc, joined, prompt, params)
        except Exception as error:
            doc.closed = True
            return JobOutcome(
                doc.job.id, error=f"could not build the prompt (level {doc.level}): {describe(error)}"
            ), []

    def _outcome(self, doc: _Doc, summary: str, prompt: PromptPlan, params: GenerationParams) -> JobOutcome:
        """A finished document: its summary (trimmed back to its last sentence when the batch asks and
        the limit cut it), why generation stopped, and the quality warnings on the text."""
        chat = doc.job.request is not None  # a chat request's answer is returned as generated
        if params.trim == "sentence" and doc.finish_reason == "length" and not chat:
            summary = trim_to_sentence(summary) or summary
        instructions = ""
        if doc.template is not None and doc.variant is not None:  # the prompt without its document
            instructions = prompt.render(doc.template, "", doc.language)
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
            finish_reason=doc.finish_reason,
            warnings=warnings_for(
                summary, instructions=instructions, document=doc.job.text, finish_reason=doc.finish_reason
            ),
        )

    # -- calls -------------------------------------------------------------------------------

    def _calls_of(self, group: list[_Item]) -> Iterator[list[tuple[_Item, Generated, int]]]:
        """`group`'s rows generated, a call at a time, or as they finish where the backend batches
        continuously; each with the number of the backend call that made it."""
        if getattr(self.backend, "streams_rows", False):
            yield from self._streamed(group)
        else:
            yield from self._packed(group)

    def _packed(self, group: list[_Item]) -> Iterator[list[tuple[_Item, Generated, int]]]:
        """`group` (sorted by length) in packed generate calls."""
        for items in self._batches(group):
            yield [(item, done, call) for item, (done, call) in zip(items, self._generate_safely(items), strict=True)]

    def _streamed(self, items: list[_Item]) -> Iterator[list[tuple[_Item, Generated, int]]]:
        """All of `items` through the backend's `generate_stream`, handed on as rows finish. Should it
        fail, the rows not finished yet go through packed calls (which halve down to a failing row)."""
        self._calls += 1
        call = self._calls
        left = set(range(len(items)))
        try:
            for finished in self.backend.generate_stream([item.row for item in items]):  # type: ignore[attr-defined]
                left.difference_update(number for number, _ in finished)
                yield [(items[number], done, call) for number, done in finished]
        except Exception as error:
            rest = [items[number] for number in sorted(left)]
            log.warning("continuous generation stopped with %d row(s) left: %s", len(rest), describe(error))
            if self.backend.is_out_of_memory(error):
                self._lower_budget([item.row for item in rest])
            yield from self._packed(rest)

    def _lower_budget(self, rows: list[Row]) -> None:
        """After out-of-memory on `rows`: half their cost becomes the budget for the rest of the chunk."""
        longest, new = max(r.positions for r in rows), max(r.max_new_tokens for r in rows)
        cost = batch_cost(longest, new, len(rows), self.align)
        self.budget = max(defaults.MIN_TOKEN_BUDGET, min(self.budget, cost // 2))
        log.warning("out of memory on %d rows; token budget now %d", len(rows), self.budget)

    def _batches(self, group: list[_Item]) -> Iterator[list[_Item]]:
        """`group` (sorted by length) in generate calls, packed one at a time so a lowered budget applies at once."""
        if self.backend.packs_itself:
            yield group
            return
        lengths = [item.row.positions for item in group]  # a soft prompt's positions count too
        max_new_tokens = max(item.row.max_new_tokens for item in group)
        start = 0
        while start < len(group):
            end = take_batch(lengths, start, max_new_tokens, self.budget, self.max_batch_size, self.align)
            yield group[start:end]
            start = end

    def _generate_safely(self, items: list[_Item]) -> list[tuple[Generated, int]]:
        """Generate a call; on any error split it in half, down to the failing row. Each result comes
        with the number of the backend call that made it.

        Out of memory also lowers the token budget for the rest of the chunk.
        """
        rows = [item.row for item in items]
        self._calls += 1
        call = self._calls
        try:
            return [(done, call) for done in self.backend.generate(rows)]
        except Exception as error:
            if self.backend.is_out_of_memory(error):
                self._lower_budget(rows)
            if len(items) == 1:
                log.warning("job %s failed: %s", items[0].doc.job.id, describe(error))
                return [(Generated(None, 0.0, describe(error)), call)]
            half = len(items) // 2
            return self._generate_safely(items[:half]) + self._generate_safely(items[half:])


def describe(error: BaseException) -> str:
    """`Type: first line of the message`, for a job's error."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
