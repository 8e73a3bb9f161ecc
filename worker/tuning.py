"""Tuning an adapter with the model frozen: a soft prompt (PEFT prompt tuning) or a LoRA.

The training examples are rendered exactly as generation renders them (the batch's template
through the model's chat template, by the same `Prompter`), and the loss covers the reference
summary's tokens and the end of the turn only. The soft prompt starts as the embedding of the
template's own text. Training saves a checkpoint every few steps under its work folder and
resumes from it when run again with the same data and settings; the adapter is written with
PEFT's `save_pretrained` (adapter_config.json, adapter_model.safetensors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import AdapterError
from models.model_names import resolve_model
from models.prompts import PromptPlan
from models.scoring import score_summaries
from models.settings import Settings
from worker.backends.base import AdapterSpec
from worker.backends.hf import TransformersBackend
from worker.prompting import Prompter

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TuneConfig:
    """How to tune (the CLI's `sumfleet tune` flags)."""

    method: str = "prompt-tuning"  # or lora
    virtual_tokens: int = 20  # soft prompt length
    init_text: str | None = None  # the soft prompt starts as these tokens' embeddings (default: the template's text)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (whatever the epochs say)
    learning_rate: float | None = None  # default: 3e-3 for a soft prompt, 5e-4 for a LoRA
    batch_size: int = 4
    max_input_tokens: int = 512  # documents are cut so that their prompt fits this (CPU-friendly)
    max_target_tokens: int = 96  # reference summaries are cut to this many tokens
    lora_rank: int = 8
    seed: int = 0
    checkpoint_every: int = 20  # optimizer steps between checkpoints

    @property
    def rate(self) -> float:
        return self.learning_rate or (3e-3 if self.method == "prompt-tuning" else 5e-4)


@dataclass(frozen=True)
class Example:
    """A training pair: a document and its reference summary."""

    document: str
    reference: str


@dataclass
class TuneResult:
    steps: int
    seconds: float
    first_loss: float  # mean loss of the first tenth of the steps
    last_loss: float  # ... and of the last tenth
    resumed_from: int  # the step a checkpoint resumed from (0: a fresh start)
    tokens: int  # tokens read (forward and backward) in this run


def fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 of the training pairs, in order: which data an adapter was tuned on."""
    digest = hashlib.sha256()
    for example in examples:
        for part in (example.document, example.reference):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def load_base(model: str, settings: Settings) -> TransformersBackend:
    """The frozen base model, loaded the way a worker loads it (same dtype, same weights)."""
    source = resolve_model(model, settings)
    if source.kind in ("lead", "plugin"):
        raise AdapterError(f"model {model!r} has no weights to tune: tuning needs a transformers model")
    backend = TransformersBackend.load(model, source, settings)
    if backend.encoder_decoder:
        raise AdapterError(f"model {model!r} is an encoder-decoder: sumfleet tunes decoder-only chat models")
    return backend


def tune(
    backend: TransformersBackend,
    settings: Settings,
    examples: Sequence[Example],
    plan: PromptPlan,
    config: TuneConfig,
    work_dir: Path,
    out_dir: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> TuneResult:
    """Train an adapter on `examples` and write it to `out_dir`; resumable from `work_dir`
    (a checkpoint there from a run of the same data and settings; removed once the adapter is written)."""
    from peft import get_peft_model

    if not examples:
        raise AdapterError("no training examples")
    torch.manual_seed(config.seed)
    prompter = Prompter(backend, settings.model_copy(update={"max_input_tokens": config.max_input_tokens}))
    rows = [_encode(prompter, plan, example, config) for example in examples]
    base = backend.model
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    model = get_peft_model(base, _peft_config(config))
    if config.method == "prompt-tuning":
        _init_soft_prompt(model, backend, plan, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # fp32 master weights, whatever the frozen model's dtype
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=config.rate, weight_decay=0.0)
    per_epoch = math.ceil(len(rows) / config.batch_size)
    total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
    batches = _batches(len(rows), config, math.ceil(total / per_epoch))
    work_dir.mkdir(parents=True, exist_ok=True)
    step, losses = _resume(work_dir, model, optimizer, trainable, config, examples)
    resumed_from, started, tokens = step, time.perf_counter(), 0
    model.train()
    pad = backend.pad_id
    while step < total:
        chosen = [rows[i] for i in batches[step]]
        input_ids, labels, attention = (t.to(backend.device) for t in _collate(chosen, pad))
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += int(attention.sum())
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, total, losses[-1])
        if step % config.checkpoint_every == 0 or step == total:
            _checkpoint(work_dir, model, optimizer, trainable, step, losses, config, examples)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    shutil.rmtree(work_dir, ignore_errors=True)  # done: the checkpoint served its purpose (resuming a kill)
    _unwrap(model, backend)
    tenth = max(1, len(losses) // 10)
    return TuneResult(
        steps=step,
        seconds=time.perf_counter() - started,
        first_loss=sum(losses[:tenth]) / tenth,
        last_loss=sum(losses[-tenth:]) / tenth,
        resumed_from=resumed_from,
        tokens=tokens,
    )


def _peft_config(config: TuneConfig) -> Any:
    from peft import LoraConfig, PromptTuningConfig, TaskType

    if config.method == "prompt-tuning":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.virtual_tokens)
    if config.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
    raise AdapterError(f"unknown tuning method {config.method!r}: use prompt-tuning or lora")


def _init_soft_prompt(model: Any, backend: TransformersBackend, plan: PromptPlan, config: TuneConfig) -> None:
    """Start the soft prompt from the embeddings of the template's text (repeated to its length)."""
    text = config.init_text or next(iter(plan.variants.values())).replace("{document}", "").strip()
    ids = backend.tokenizer.encode(text) or [backend.pad_id]
    ids = (ids * math.ceil(config.virtual_tokens / len(ids)))[: config.virtual_tokens]
    with torch.no_grad():
        start = backend.model.get_input_embeddings()(torch.tensor(ids, device=backend.device))
        model.prompt_encoder["default"].embedding.weight.copy_(start.float())


def _encode(prompter: Prompter, plan: PromptPlan, example: Example, config: TuneConfig) -> tuple[list[int], list[int]]:
    """(prompt ids as generation renders them, reference ids ending the turn)."""
    _, template, language = plan.for_document(example.document)
    reserved = config.virtual_tokens if config.method == "prompt-tuning" else 0
    room = max(16, config.max_input_tokens - reserved)
    prompt = prompter.fit(plan, template, language, example.document, room)
    tokenizer = prompter.tokenizer
    end = getattr(getattr(tokenizer, "hf", None), "eos_token_id", None)
    target = tokenizer.encode(example.reference.strip())[: config.max_target_tokens]
    return prompt, target + ([end] if end is not None else [])


def _collate(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids, labels (-100 but on the reference) and attention mask."""
    width = max(len(prompt) + len(target) for prompt, target in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for number, (prompt, target) in enumerate(rows):
        joined = prompt + target
        input_ids[number, : len(joined)] = torch.tensor(joined)
        labels[number, len(prompt) : len(joined)] = torch.tensor(target)
        attention[number, : len(joined)] = 1
    return input_ids, labels, attention


def _batches(count: int, config: TuneConfig, epochs: int) -> list[list[int]]:
    """The examples' batches over all epochs: a shuffle per epoch (fixed by the seed), cut into
    batches of `batch_size` (an epoch's last batch may be smaller)."""
    generator = random.Random(config.seed)
    batches: list[list[int]] = []
    for _ in range(epochs):
        epoch = list(range(count))
        generator.shuffle(epoch)
        batches += [epoch[start : start + config.batch_size] for start in range(0, count, config.batch_size)]
    return batches


def _identity(config: TuneConfig, examples: Sequence[Example]) -> str:
    return hashlib.sha256((json.dumps(asdict(config), sort_keys=True) + fingerprint(examples)).encode()).hexdigest()


def _checkpoint(
    work_dir: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    step: int,
    losses: list[float],
    config: TuneConfig,
    examples: Sequence[Example],
) -> None:
    """Save the trainable weights, the optimizer and the step (written aside, then renamed into place)."""
    state = {
        "identity": _identity(config, examples),
        "step": step,
        "losses": losses,
        "weights": [p.detach().clone() for p in trainable],
        "optimizer": optimizer.state_dict(),
    }
    scratch = work_dir / f".{CHECKPOINT}.{os.getpid()}"
    torch.save(state, scratch)
    scratch.replace(work_dir / CHECKPOINT)


def _resume(
    work_dir: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    config: TuneConfig,
    examples: Sequence[Example],
) -> tuple[int, list[float]]:
    """The step and losses of the last checkpoint of this very training (same data and settings), if any."""
    path = work_dir / CHECKPOINT
    if not path.exists():
        return 0, []
    state = torch.load(path, weights_only=False)
    if state.get("identity") != _identity(config, examples):
        log.warning("ignoring the checkpoint in %s: it belongs to other data or settings", work_dir)
        return 0, []
    with torch.no_grad():
        for parameter, saved in zip(trainable, state["weights"], strict=True):
            parameter.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming training at step %d from %s", state["step"], path)
    return int(state["step"]), list(state["losses"])


def _unwrap(model: Any, backend: TransformersBackend) -> None:
    """Give the backend its plain model back (a prompt-tuning wrapper adds nothing to the base;
    LoRA layers are removed), so the same process can generate without the adapter."""
    backend.model = model.unload() if hasattr(model, "unload") and _has_lora(model) else model.get_base_model()
    backend.model.eval()


def _has_lora(model: Any) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def summarize(
    backend: TransformersBackend,
    settings: Settings,
    name: str,
    plan: PromptPlan,
    documents: Sequence[str],
    max_new_tokens: int,
    adapter: AdapterSpec | None = None,
) -> list[str]:
    """Summaries of `documents` by the loaded model (with `adapter`, or zero-shot), through the
    same pipeline a worker runs (trimmed as `SUMFLEET_TRIM` says); a failed document gives an
    empty summary."""
    from models.claims import ClaimedJob
    from worker.engine import GenerationParams
    from worker.pipeline import GenerationPipeline

    pipeline = GenerationPipeline(name, backend, settings)
    jobs = [ClaimedJob(number, str(number), text, 1) for number, text in enumerate(documents)]
    params = GenerationParams(max_new_tokens, settings.long_documents, adapter, settings.trim)
    found = {o.job_id: o.summary or "" for batch in pipeline.run(jobs, plan, params) for o in batch}
    return [found.get(number, "") for number in range(len(documents))]


@dataclass
class TuningOutcome:
    """What `run` made: the adapter's reference, how training went, and the held-out scores."""

    adapter: str  # name@version
    result: TuneResult
    scores: dict[str, Any] | None

    def describe(self, describe_scores: Callable[[dict[str, Any]], str]) -> str:
        r = self.result
        resumed = f", resumed at step {r.resumed_from}" if r.resumed_from else ""
        lines = [
            f"adapter {self.adapter}: {r.steps} steps in {r.seconds:.0f}s "
            f"({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s){resumed}; loss {r.first_loss:.3f} -> {r.last_loss:.3f}"
        ]
        if self.scores is not None:
            lines.append(describe_scores(self.scores))
        return "\n".join(lines)


def run(
    sessions: Any,
    settings: Settings,
    name: str,
    train: Sequence[Example],
    heldout: Sequence[Example],
    config: TuneConfig,
    prompt: str | None,
    max_new_tokens: int,
    *,
    progress: Callable[[int, int, float], None] | None = None,
) -> TuningOutcome:
    """Tune a new version of adapter `name` on the settings' model, score the zero-shot prompt,
    the adapter and Lead-3 on `heldout` (ROUGE with intervals), and record it in the adapter store."""
    from models.adapters import adapter_dir, add_adapter, check_name, next_version
    from models.model_names import canonical_model
    from models.prompts import resolve_prompt

    check_name(name)
    model = canonical_model(settings.model)
    resolved = resolve_prompt(settings.prompt if prompt is None else prompt)
    plan = PromptPlan(resolved.variants)
    root = adapter_dir(settings.adapter_dir)
    with sessions() as session:
        version = next_version(session, name)
    relative = f"{name}/{version}"
    backend = load_base(model, settings)
    data = fingerprint(train)
    work = root / ".training" / f"{name}-{config.method}-{data[:12]}"
    log.info("tuning %s@%d (%s) on %d examples of %s", name, version, config.method, len(train), model)
    result = tune(backend, settings, train, plan, config, work, root / relative, progress)
    scores = None
    if heldout:
        virtual = config.virtual_tokens if config.method == "prompt-tuning" else 0
        spec = AdapterSpec(f"{name}@{version}", config.method, str(root / relative), virtual)
        documents = [example.document for example in heldout]
        pairs = [(example.document, example.reference) for example in heldout]
        zero = score_summaries(summarize(backend, settings, model, plan, documents, max_new_tokens), pairs)
        tuned = score_summaries(summarize(backend, settings, model, plan, documents, max_new_tokens, spec), pairs)
        scores = {"n": zero["n"], "zero_shot": zero["system"], "adapter": tuned["system"], "lead3": zero["lead3"]}
    template = resolved.name if resolved.name != "custom" else resolved.template
    with sessions.begin() as session:
        add_adapter(
            session,
            name=name,
            version=version,
            base_model=model,
            method=config.method,
            params={**asdict(config), "prompt": template, "max_new_tokens": max_new_tokens},
            data_fingerprint=data,
            train_examples=len(train),
            scores=scores,
            path=relative,
        )
    return TuningOutcome(f"{name}@{version}", result, scores)


def run_claimed(sessions: Any, settings: Settings, run_id: str, worker: str) -> str | None:
    """A worker's side of `sumfleet tune --submit`: claim the run, train it (renewing its lease at
    every step, resuming from its checkpoint after a worker died), record the adapter. Returns the
    adapter's name@version, or None when the run was not to be had or failed (its reason recorded)."""
    from models.tuning_runs import claim_run, examples, finish_run
    from models.tuning_runs import progress as record_progress

    with sessions.begin() as session:
        claimed = claim_run(session, run_id, worker, settings.tune_lease)
        if claimed is None:
            log.info("tuning run %s: nothing to do (ended, or held by a live worker)", run_id)
            return None
        name, model, prompt, max_new = claimed.name, claimed.model, claimed.prompt, claimed.max_new_tokens
        config = TuneConfig(**claimed.config)
    with sessions() as session:
        train = [Example(d, r) for d, r in examples(session, run_id, heldout=False)]
        heldout = [Example(d, r) for d, r in examples(session, run_id, heldout=True)]

    def progress(step: int, total: int, loss: float) -> None:
        with sessions.begin() as session:
            record_progress(session, run_id, worker, step, total, loss, settings.tune_lease)

    log.info("tuning run %s: %s on %d examples of %s", run_id, config.method, len(train), model)
    try:
        outcome = run(
            sessions,
            settings.model_copy(update={"model": model}),
            name,
            train,
            heldout,
            config,
            prompt,
            max_new,
            progress=progress,
        )
    except Exception as error:  # recorded with the run; the message was acked when taken
        log.exception("tuning run %s failed", run_id)
        with sessions.begin() as session:
            finish_run(session, run_id, worker, error=f"{type(error).__name__}: {error}")
        return None
    with sessions.begin() as session:
        finish_run(session, run_id, worker, adapter=outcome.adapter)
    log.info("tuning run %s made adapter %s", run_id, outcome.adapter)
    return outcome.adapter
