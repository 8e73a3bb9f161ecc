"""Which engine serves a model, and loading it (the slow part of a worker's start).

`SUMFLEET_ENGINE` chooses: `transformers` (the generation pipeline over the transformers
backend), `llama.cpp` (GGUF files as they are), `ctranslate2` (a decoder-only model converted
once, int8 kernels), `vllm` (vLLM's offline engine, one worker per GPU), `lead` (extractive), or
`auto`, the one the model calls for. A plugin model
(`python:package.module:factory`) is your own: the factory returns an `Engine`, or a
`Backend` that then runs under the same pipeline as the built-in ones.
"""

from __future__ import annotations

import importlib
from typing import cast

from models.errors import ConfigError
from models.model_names import ModelSource, resolve_model
from models.settings import Settings
from worker.backends.base import Backend
from worker.engine import Engine
from worker.hardware import cpu_has_fast_bf16, installed, nvidia_gpu_present
from worker.lead import LeadEngine
from worker.pipeline import GenerationPipeline


def load_engine(name: str, settings: Settings) -> Engine:
    """Load the engine for model `name` (the slow part of a worker's start)."""
    source = resolve_model(name, settings)
    if source.kind == "plugin":
        module, _, attribute = source.location.partition(":")
        made = getattr(importlib.import_module(module), attribute)(name, settings)
        return cast(Engine, made) if hasattr(made, "run") else GenerationPipeline(name, cast(Backend, made), settings)
    choice = settings.engine if settings.engine != "auto" else auto_engine(source, settings)
    if (choice == "lead") != (source.kind == "lead"):
        served = "the lead models (lead, lead-N)" if choice == "lead" else "generative models, not lead"
        raise ConfigError(f"SUMFLEET_ENGINE={choice} serves {served}; it cannot serve model {name!r}")
    if choice == "lead":
        return LeadEngine(name, source.lead_sentences)
    if choice == "llama.cpp":
        from worker.backends.llamacpp import LlamaCppBackend

        return GenerationPipeline(name, LlamaCppBackend.load(name, source, settings), settings)
    if choice == "ctranslate2":
        from worker.backends.ctranslate2 import CTranslate2Backend

        return GenerationPipeline(name, CTranslate2Backend.load(name, source, settings), settings)
    if choice == "vllm":
        from worker.backends.vllm import VllmBackend

        return GenerationPipeline(name, VllmBackend.load(name, source, settings), settings)
    from worker.backends.hf import TransformersBackend  # imports torch: only when a model needs it

    return GenerationPipeline(name, TransformersBackend.load(name, source, settings), settings)


def auto_engine(source: ModelSource, settings: Settings) -> str:
    """What `SUMFLEET_ENGINE=auto` runs a model with, by what was measured fastest at equal quality.

    `lead` for the lead models. A GGUF file on a CPU without fast bf16 goes to llama.cpp when
    it is installed (its f16 kernels ran 1.5x transformers' float32 there, in a third of the memory);
    everything else to transformers (bf16 on CPUs that have it: 2.4x llama.cpp's f16, bf16 or q8_0
    on a Sapphire Rapids CPU; CUDA on GPUs). README: Engines.
    vLLM and CTranslate2 are chosen explicitly: vLLM has not been measured on a GPU here yet, and
    it runs no adapters, which a worker's batches may ask for; CTranslate2 measured slower.
    """
    if source.kind == "lead":
        return "lead"
    on_cpu = settings.device == "cpu" or (settings.device == "auto" and not nvidia_gpu_present())
    if source.gguf_file and on_cpu and settings.dtype in ("auto", "float32") and not cpu_has_fast_bf16():
        return "llama.cpp" if installed("llama_cpp") else "transformers"
    return "transformers"
