"""A GGUF model de-quantized once into a plain checkpoint on disk, so later loads skip the unpacking.

transformers cannot `save_pretrained` a GGUF-loaded model ("not serializable"), so the
state dict, config and tokenizer are written here by hand, as a complete Hugging Face
checkpoint: tied weights are stored once under the input embedding's name (as transformers and
vLLM expect), not only as `lm_head.weight`. The cache is keyed by the GGUF file's content
(SHA-256, remembered per path, size and modification time so it is read once), the dtype and
the transformers version: a reinstall of the same file reuses it. Writes go to a temporary
folder renamed into place, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers

from worker.backends.cache import content_digest

log = logging.getLogger(__name__)


def cache_key(gguf_path: Path, cache_dir: Path, dtype: object) -> str:
    kind = str(dtype).removeprefix("torch.")
    return f"{gguf_path.stem}-{content_digest(gguf_path, cache_dir)}-{kind}-tf{transformers.__version__}"


def cached_checkpoint(gguf_path: Path, cache_dir: Path, dtype: object) -> Path | None:
    """The cached plain checkpoint of `gguf_path` in `dtype`, if one was written."""
    folder = cache_dir / cache_key(gguf_path, cache_dir, dtype)
    return folder if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file() else None


def write_checkpoint(model: Any, tokenizer: Any, gguf_path: Path, cache_dir: Path, dtype: object) -> Path | None:
    """Save a GGUF-loaded (de-quantized) model as a plain checkpoint; None if that failed (logged)."""
    from safetensors.torch import save_file

    folder = cache_dir / cache_key(gguf_path, cache_dir, dtype)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=cache_dir))
        save_file(complete_state(model), str(scratch / "model.safetensors"), metadata={"format": "pt"})
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


def complete_state(model: Any) -> dict[str, Any]:
    """The model's weights as a Hugging Face checkpoint holds them: a tensor shared by several names
    (a tied output layer) is stored once, under its first name, the input embedding's."""
    kept: dict[str, Any] = {}
    stored: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in stored:
            continue
        stored.add(tensor.data_ptr())
        kept[name] = tensor.detach().contiguous()
    return kept
