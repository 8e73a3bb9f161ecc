"""The FastAPI application of `sumfleet api`, and serving it with uvicorn."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from models.errors import SumfleetError
from models.settings import Settings
from models.tables import ApiKey
from producer.api import errors, native, openai_routes, service
from producer.api.auth import bearer, current_key
from producer.api.background import Maintainer
from producer.api.checks import accepted_models
from producer.api.errors import ApiError, error_body, error_responses, sumfleet_error
from producer.api.limits import RateDecision, RequestLimiter
from producer.api.schemas import Health, Readiness
from producer.api.validation import Validator
from producer.client import Client

log = logging.getLogger(__name__)

DESCRIPTION = """\
Summarization batches over HTTP, on the same database and broker as `sumfleet submit`.

* **OpenAI-compatible** Batch API under `/v1` (files and batches of `/v1/chat/completions`
  requests): point an OpenAI client's `base_url` at `http://HOST:PORT/v1`.
* **Native** endpoints under `/api/v1`: documents in, summaries out, with sumfleet's prompt
  templates and settings.

Every endpoint but `/health` needs `Authorization: Bearer <key>` (`sumfleet keys create`),
checked before the request's body is read; a key sees only the batches and files it created. Errors have OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""


KEY_STATE = "sumfleet_api_key"  # where RequireKey leaves the caller's key in the request's state


class RequireKey:
    """ASGI middleware: every request but `open_paths` (GET/HEAD) is authenticated before anything
    reads its body, so a client without a valid key cannot make the API receive and parse a big
    upload. The answer is `current_key`'s 401 in the error shape; the key found is left in the
    request's state (`KEY_STATE`) for the routes' `current_key` dependency.

    With a `limiter`, the request is then counted against its key's requests per minute: over the
    limit it is answered 429 with `Retry-After` (before its body is read), and every answer to a
    limited key carries the `x-ratelimit-*-requests` headers.
    """

    def __init__(self, app: Any, open_paths: Iterable[str], limiter: RequestLimiter | None = None) -> None:
        self.app = app
        self.open_paths = frozenset(open_paths)
        self.limiter = limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"] in ("GET", "HEAD") and _route_path(scope) in self.open_paths):
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # headers only: nothing here calls `receive`
        try:
            credentials = await bearer(request)
            key, decision = await run_in_threadpool(self._check, request, credentials)
        except ApiError as refused:
            await _respond(scope, receive, send, refused)
            return
        except SumfleetError as failure:
            await _respond(scope, receive, send, sumfleet_error(failure))
            return
        except DBAPIError as failure:
            log.warning("cannot check an API key: %s", failure)
            unreachable = ApiError(503, f"database unreachable: {type(failure).__name__}", code="service_unavailable")
            await _respond(scope, receive, send, unreachable)
            return
        if decision is not None and not decision.allowed:
            await _respond(scope, receive, send, decision.refusal())
            return
        scope.setdefault("state", {})[KEY_STATE] = key
        if decision is None:
            await self.app(scope, receive, send)
            return
        extra = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in decision.headers().items()
        ]

        async def send_with_limits(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)

    def _check(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None
    ) -> tuple[ApiKey, RateDecision | None]:
        """The request's key (or 401), and its count against the key's requests per minute (None: no limit)."""
        key = current_key(request, credentials)
        return key, self.limiter.take(key) if self.limiter is not None else None


def _route_path(scope: Any) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    return path[len(root) :] if root and path.startswith(root) else path


async def _respond(scope: Any, receive: Any, send: Any, error: ApiError) -> None:
    body = error_body(error.status, error.message, type=error.type, param=error.param, code=error.code)
    await JSONResponse(body, status_code=error.status, headers=error.headers)(scope, receive, send)


def checked_key(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
    """`current_key` for the routes: the key `RequireKey` already checked for this request (one
    database lookup per request), or the check itself where no middleware ran."""
    key = request.scope.get("state", {}).get(KEY_STATE)
    return key if isinstance(key, ApiKey) else current_key(request, credentials)


DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")
DOCS_ASSETS = "/docs-assets"


def _serve_docs(app: FastAPI) -> list[str]:
    """/docs (Swagger UI) and /redoc with their JavaScript and CSS served by this process from the
    `fastapi-offline` package's copies, not a CDN; returns the asset paths (open, like the pages)."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    folder = Path(str(files("fastapi_offline") / "static"))
    app.mount(DOCS_ASSETS, StaticFiles(directory=folder), name="docs-assets")
    openapi = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi,
            title="sumfleet API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi,
            title="sumfleet API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    return [f"{DOCS_ASSETS}/{p.name}" for p in folder.iterdir() if p.is_file()]


def create_app(settings: Settings, *, client: Client | None = None, background: bool = True) -> FastAPI:
    """The app; `background` runs the loop that ends batches, expires and deletes files, delivers webhooks and
    takes over validations left by dead processes in this process (one thread). Large batch files are
    validated in threads of the app's `Validator` either way."""
    client = client or Client(settings)
    models = accepted_models(settings)
    validator = Validator(client, settings, models)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client.ensure_schema()
        client.app  # noqa: B018 - build the Celery app once, before requests share it
        maintainer = Maintainer(client.sessions, settings, validator) if background else None
        if maintainer is not None:
            maintainer.start()
        try:
            yield
        finally:
            if maintainer is not None:
                maintainer.stop()
            validator.stop()  # validations under way give their batches back to the next process
            client.close()

    app = FastAPI(
        title="sumfleet",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from local assets: the pages work without internet
        redoc_url=None,
    )
    app.add_middleware(errors.BodyLimit, limit=settings.api_max_upload_bytes)
    assets = _serve_docs(app)
    open_paths = {"/health", "/ready", "/metrics", app.openapi_url, *DOCS_PAGES, *assets}
    app.add_middleware(  # outermost: before any body
        RequireKey, open_paths={path for path in open_paths if path}, limiter=RequestLimiter(client.sessions, settings)
    )
    app.dependency_overrides[current_key] = checked_key
    app.state.settings = settings
    app.state.client = client
    app.state.models = models
    app.state.validator = validator
    app.state.started = int(time.time())  # the `created` of the models listed at /v1/models
    errors.install(app)

    @app.get("/health", response_model=Health, tags=["service"], summary="Liveness: the process answers")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=Readiness,
        tags=["service"],
        summary="Readiness: the database and the broker answer (503 naming what does not)",
        responses=error_responses(503),
    )
    def ready(request: Request) -> dict[str, str]:
        problems = service.unreachable(request.app.state.client)
        if problems:
            raise ApiError(503, "not ready: " + "; ".join(problems), code="service_unavailable")
        return {"status": "ready", "database": "ok", "broker": "ok"}

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest

    from models.metrics import FleetCollector, QueueLength

    registry = CollectorRegistry()
    registry.register(FleetCollector(client.sessions, QueueLength(settings.broker_url)))
    ProcessCollector(registry=registry)

    @app.get(
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics: backlog in documents, jobs by state, queue messages, webhook deliveries",
        response_class=PlainTextResponse,
    )
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_routes.router)
    app.include_router(native.router)
    return app


def prepared(settings: Settings) -> FastAPI:
    """The app for `sumfleet api`, once the schema is current (migrated like `submit` does)."""
    client = Client(settings)
    client.ensure_schema()  # a bad URL or an unreachable database fails here with a clear message
    return create_app(settings, client=client)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", log_format: str = "text") -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM (the background loop stops with it)."""
    import uvicorn

    from models.logs import uvicorn_config

    config = uvicorn_config(log_format)
    if config is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    else:
        uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=config)
