"""Which engine serves a model, and loading it (the slow part of a worker's start).

`SUMFLEET_ENGINE` chooses: `transformers` (the generation pipeline over the transformers
backend), `lead` (extractive), or `auto`, the one the model calls for. A plugin model
(`python:package.module:factory`) is your own: the factory returns an `Engine`, or a
`Backend` that then runs under the same pipeline as the built-in ones.
"""

from __future__ import annotations

import importlib
from typing import cast

from models.errors import ConfigError
from models.model_names import resolve_model
from models.settings import Settings
from worker.backends.base import Backend
from worker.engine import Engine
from worker.lead import LeadEngine
from worker.pipeline import GenerationPipeline


def load_engine(name: str, settings: Settings) -> Engine:
    """Load the engine for model `name` (the slow part of a worker's start)."""
    source = resolve_model(name, settings)
    if source.kind == "plugin":
        module, _, attribute = source.location.partition(":")
        made = getattr(importlib.import_module(module), attribute)(name, settings)
        return cast(Engine, made) if hasattr(made, "run") else GenerationPipeline(name, cast(Backend, made), settings)
    choice = settings.engine
    if choice == "auto":
        choice = "lead" if source.kind == "lead" else "transformers"
    if (choice == "lead") != (source.kind == "lead"):
        served = "the lead models (lead, lead-N)" if choice == "lead" else "generative models, not lead"
        raise ConfigError(f"SUMFLEET_ENGINE={choice} serves {served}; it cannot serve model {name!r}")
    if choice == "lead":
        return LeadEngine(name, source.lead_sentences)
    from worker.backends.hf import TransformersBackend  # imports torch: only when a model needs it

    return GenerationPipeline(name, TransformersBackend.load(name, source, settings), settings)
