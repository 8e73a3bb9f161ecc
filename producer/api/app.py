"""The FastAPI application of `sumfleet api`, and serving it with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from models.settings import Settings
from producer.api import errors, native, openai_routes, service
from producer.api.background import Maintainer
from producer.api.checks import accepted_models
from producer.api.errors import ApiError, error_responses
from producer.api.schemas import Health
from producer.client import Client

log = logging.getLogger(__name__)

DESCRIPTION = """\
Summarization batches over HTTP, on the same database and broker as `sumfleet submit`.

* **OpenAI-compatible** Batch API under `/v1` (files and batches of `/v1/chat/completions`
  requests): point an OpenAI client's `base_url` at `http://HOST:PORT/v1`.
* **Native** endpoints under `/api/v1`: documents in, summaries out, with sumfleet's prompt
  templates and settings.

Every endpoint but `/health` needs `Authorization: Bearer <key>` (`sumfleet keys create`);
a key sees only the batches and files it created. Errors have OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""


def create_app(settings: Settings, *, client: Client | None = None, background: bool = True) -> FastAPI:
    """The app; `background` runs the finalize/expiry/webhook loop in this process (one thread)."""
    client = client or Client(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.ensure_schema()
        client.app  # noqa: B018 - build the Celery app once, before requests share it
        maintainer = Maintainer(client.sessions, settings) if background else None
        if maintainer is not None:
            maintainer.start()
        try:
            yield
        finally:
            if maintainer is not None:
                maintainer.stop()
            client.close()

    app = FastAPI(
        title="sumfleet",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(errors.BodyLimit, limit=settings.api_max_upload_bytes)
    app.state.settings = settings
    app.state.client = client
    app.state.models = accepted_models(settings)
    errors.install(app)

    @app.get(
        "/health",
        response_model=Health,
        tags=["service"],
        summary="Liveness: the database answers",
        responses=error_responses(503),
    )
    def health(request: Request) -> dict[str, str]:
        try:
            service.ping(request.app.state.client)
        except Exception as error:  # any driver error: the database is not usable
            raise ApiError(503, f"database unreachable: {type(error).__name__}", code="service_unavailable") from None
        return {"status": "ok"}

    app.include_router(openai_routes.router)
    app.include_router(native.router)
    return app


def prepared(settings: Settings) -> FastAPI:
    """The app for `sumfleet api`, once the schema is current (migrated like `submit` does)."""
    client = Client(settings)
    client.ensure_schema()  # a bad URL or an unreachable database fails here with a clear message
    return create_app(settings, client=client)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM (the background loop stops with it)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
