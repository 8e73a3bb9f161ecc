"""`sumfleet api`: the HTTP API (FastAPI), OpenAI Batch API compatible, over the producer's database and broker.

from producer.api import create_app, verify_signature
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from producer.api.webhooks import InvalidSignature, verify_signature

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(*args: Any, **kwargs: Any) -> FastAPI:
    """See `producer.api.app.create_app` (imported lazily: FastAPI loads only when the API runs)."""
    from producer.api.app import create_app as create

    return create(*args, **kwargs)


__all__ = ["InvalidSignature", "create_app", "verify_signature"]
