"""API keys on requests: `Authorization: Bearer <key>`; the key is looked up by its SHA-256.

A key sees only what it created: routes load objects with the key's id as owner, and an
object of another key answers 404 exactly like a missing one.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from models.tables import ApiKey
from producer.api import service
from producer.api.errors import ApiError

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="sk-sumfleet-...",
    description="An API key from `sumfleet keys create`, sent as `Authorization: Bearer <key>`.",
)

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def current_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
    """The caller's key, or 401 (no key, an unknown key, a revoked key)."""
    if credentials is None:
        given = request.headers.get("authorization")
        message = (
            "no API key: send it as `Authorization: Bearer <key>` (create one with `sumfleet keys create`)"
            if not given
            else "the Authorization header must be `Bearer <key>`"
        )
        raise ApiError(401, message, code="missing_api_key", headers=_CHALLENGE)
    key = service.find_key(request.app.state.client.sessions, credentials.credentials.strip())
    if key is None:
        raise ApiError(401, "invalid API key: no such key", code="invalid_api_key", headers=_CHALLENGE)
    if key.revoked_at is not None:
        raise ApiError(401, f"API key {key.id} has been revoked", code="revoked_api_key", headers=_CHALLENGE)
    return key
