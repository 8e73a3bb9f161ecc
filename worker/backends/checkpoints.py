"""A GGUF model de-quantized once into a plain checkpoint on disk, so later loads skip the unpacking.

transformers cannot `save_pretrained` a GGUF-loaded model ("not serializable"), so the
state dict, config and tokenizer are written here by hand, keyed by the GGUF file's name,
size and modification time and the transformers version. Writes go to a temporary folder
renamed into place, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sumfleet" / "checkpoints"


def cache_key(gguf_path: Path, dtype: object) -> str:
    stat = gguf_path.stat()
    kind = str(dtype).removeprefix("torch.")
    return f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{kind}-tf{transformers.__version__}"


def cached_checkpoint(gguf_path: Path, cache_dir: Path, dtype: object) -> Path | None:
    """The cached plain checkpoint of `gguf_path` in `dtype`, if one was written."""
    folder = cache_dir / cache_key(gguf_path, dtype)
    return folder if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() else None


def write_checkpoint(model: Any, tokenizer: Any, gguf_path: Path, cache_dir: Path, dtype: object) -> Path | None:
    """Save a GGUF-loaded (de-quantized) model as a plain checkpoint; None if that failed (logged)."""
    from safetensors.torch import save_model

    folder = cache_dir / cache_key(gguf_path, dtype)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=cache_dir))
        save_model(model, str(scratch / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        type(model.config).from_dict(config).save_pretrained(scratch)
        model.generation_config.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(scratch, ignore_errors=True)
        return folder
    except Exception as error:  # a cache is an optimisation: never fail a load because of it
        log.warning("could not cache a plain checkpoint of %s in %s: %s", gguf_path.name, cache_dir, error)
        return None
