"""Where backends keep what they derive from a model file (de-quantized checkpoints, converted
weights), and the content digest those caches are keyed by. No torch or transformers here: a
llama.cpp worker uses it too."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def kept(
    store: OrderedDict[str, T],
    key: str,
    load: Callable[[], T],
    capacity: int,
    evicted: Callable[[T], None] | None = None,
) -> T:
    """`store[key]`, made by `load()` the first time it is asked for; only the `capacity` most recently
    used stay (the loaded adapters of a backend), each one dropped handed to `evicted` (to free it)."""
    if key not in store:
        store[key] = load()
        while len(store) > capacity:
            _, dropped = store.popitem(last=False)
            if evicted is not None:
                evicted(dropped)
    store.move_to_end(key)
    return store[key]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sumfleet" / "checkpoints"


def content_digest(path: Path, cache_dir: Path) -> str:
    """The file's SHA-256 (first 16 hex digits), read once per (path, size, mtime) and remembered."""
    stat = path.stat()
    memo = cache_dir / ".digests.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known: dict[str, str] = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        known[key] = digest.hexdigest()[:16]
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            scratch = memo.with_suffix(f".{os.getpid()}")
            scratch.write_text(json.dumps(known))
            scratch.replace(memo)
        except OSError:  # an unwritable cache still works, only slower
            pass
    return known[key]
