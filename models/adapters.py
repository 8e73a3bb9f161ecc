"""Adapters as artifacts: a name and a version, the base model they were tuned on, how they were
made and how they scored; their weights live under SUMFLEET_ADAPTER_DIR.

A reference is `NAME` (the newest version) or `NAME@VERSION`. Batches record the exact version
they run with (`name@3`), so results can say which adapter produced them.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from models.errors import AdapterError
from models.store import utcnow
from models.tables import Adapter

METHODS = ("prompt-tuning", "lora")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """`name`, or `name@version` (None: the newest)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        name, _, version = text.strip().partition("@")
        check_name(name)
        if version and not version.isdigit():
            raise AdapterError(f"adapter {text!r}: a version is a number (name@3)")
        return cls(name, int(version) if version else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def split_model(text: str) -> tuple[str, str | None]:
    """`model:adapter` (how an OpenAI-style request names a tuned adapter) as (model, adapter);
    a plugin model (`python:module:factory`) keeps its colons."""
    if text.startswith("python:") or ":" not in text:
        return text, None
    model, _, adapter = text.rpartition(":")
    return model, adapter or None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AdapterError(
            f"adapter name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_adapter_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "sumfleet" / "adapters"


def adapter_dir(setting: str | None) -> Path:
    """Where adapters' weights live: SUMFLEET_ADAPTER_DIR, else ~/.local/share/sumfleet/adapters."""
    return Path(setting).expanduser() if setting else default_adapter_dir()


def next_version(session: Session, name: str) -> int:
    return int(session.scalar(select(func.coalesce(func.max(Adapter.version), 0)).where(Adapter.name == name)) or 0) + 1


def add_adapter(
    session: Session,
    *,
    name: str,
    version: int,
    base_model: str,
    method: str,
    params: dict[str, Any],
    data_fingerprint: str,
    train_examples: int,
    scores: dict[str, Any] | None,
    path: str,
) -> Adapter:
    """Record a trained adapter (its weights already written under the adapter dir, at `path`)."""
    if method not in METHODS:
        raise AdapterError(f"unknown tuning method {method!r}: use {' or '.join(METHODS)}")
    adapter = Adapter(
        id="adp_" + secrets.token_hex(8),
        name=check_name(name),
        version=version,
        base_model=base_model,
        method=method,
        params=params,
        data_fingerprint=data_fingerprint,
        train_examples=train_examples,
        scores=scores,
        path=path,
        created_at=utcnow(),
    )
    session.add(adapter)
    session.flush()
    return adapter


def find_adapter(session: Session, ref: AdapterRef | str) -> Adapter:
    """The adapter a reference names (the newest version when it names none), or `AdapterError`."""
    ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
    query = select(Adapter).where(Adapter.name == ref.name)
    if ref.version is not None:
        query = query.where(Adapter.version == ref.version)
    found = session.scalars(query.order_by(Adapter.version.desc()).limit(1)).first()
    if found is None:
        known = ", ".join(f"{a.name}@{a.version}" for a in list_adapters(session)[:10]) or "none yet"
        raise AdapterError(f"no adapter {str(ref)!r} (adapters: {known}; `sumfleet tune` makes one)")
    return found


def list_adapters(session: Session) -> list[Adapter]:
    return list(session.scalars(select(Adapter).order_by(Adapter.name, Adapter.version.desc())))


def delete_adapter(session: Session, ref: AdapterRef | str) -> Adapter:
    """Delete one version (or, for a bare name, the newest); returns it (its files are the caller's)."""
    adapter = find_adapter(session, ref)
    session.execute(delete(Adapter).where(Adapter.id == adapter.id))
    return adapter


def usable_for(adapter: Adapter, model: str) -> None:
    """Refuse an adapter tuned on another base model than `model`."""
    if adapter.base_model != model:
        raise AdapterError(
            f"adapter {adapter.name}@{adapter.version} was tuned on model {adapter.base_model!r}, "
            f"not {model!r}: it only runs with its base model"
        )
