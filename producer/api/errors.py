"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, on every endpoint.

A route raises `ApiError`; FastAPI's own errors (validation, unknown routes, bodies over the
size limit) and sumfleet's `SumfleetError`s are turned into the same shape by the handlers here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import (
    AdapterError,
    BatchNotFoundError,
    BrokerError,
    ConfigError,
    DatabaseError,
    InputError,
    InvalidTransition,
    ModelNotFoundError,
    PromptError,
    SumfleetError,
)

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, and where (the field, the line of a file)")
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, server_error, ...")
    param: str | None = Field(None, description="the request field at fault, if one is")
    code: str | None = Field(None, description="a stable code for the error, e.g. invalid_api_key")


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's error object."""

    error: ErrorDetail


class ApiError(Exception):
    """Raised by a route to answer `status` with OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers


_TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}

# The statuses each route can answer besides success, for the OpenAPI document.
_DESCRIPTIONS = {
    400: "Bad request: the message names the field or the line at fault",
    401: "Missing, unknown or revoked API key",
    404: "No such object for this key (another key's objects answer 404 too)",
    409: "The object's state does not allow this (e.g. cancelling a batch that has ended)",
    413: "Request body over SUMFLEET_API_MAX_UPLOAD_BYTES, or more documents than SUMFLEET_API_MAX_DOCUMENTS",
    422: "The request does not match the schema (a field missing or of the wrong type)",
    429: "A limit of the API key was reached (requests per minute, documents per day, batches in flight): "
    "`Retry-After` says in how many seconds to try again",
    503: "The database or the broker cannot be reached",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error model under each status it may answer."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def error_body(
    status: int, message: str, *, type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def _answer(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.status, error.message, type=error.type, param=error.param, code=error.code),
        status_code=error.status,
        headers=error.headers,
    )


def sumfleet_error(error: SumfleetError, param: str | None = None) -> ApiError:
    """The HTTP answer for an error sumfleet raised while serving a request."""
    message = str(error)
    if isinstance(error, BatchNotFoundError):
        return ApiError(404, message, code="not_found")
    if isinstance(error, ModelNotFoundError):
        return ApiError(400, message, param=param or "model", code="model_not_found")
    if isinstance(error, AdapterError):
        return ApiError(400, message, param=param or "adapter", code="adapter_not_found")
    if isinstance(error, PromptError):
        return ApiError(400, message, param=param or "prompt", code="invalid_prompt")
    if isinstance(error, (InputError, ConfigError)):
        return ApiError(400, message, param=param, code="invalid_input")
    if isinstance(error, InvalidTransition):
        return ApiError(409, message, code="invalid_state")
    if isinstance(error, (DatabaseError, BrokerError)):
        return ApiError(503, message, code="service_unavailable")
    return ApiError(500, message, code="internal_error")


def _location(loc: tuple[Any, ...]) -> str:
    parts = (
        [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else [str(p) for p in loc]
    )
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or (str(loc[0]) if loc else "request")


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body too large: the limit is {limit:,} bytes (SUMFLEET_API_MAX_UPLOAD_BYTES)",
        code="request_too_large",
    )


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes answers 413 in the error shape.

    A declared Content-Length over the limit is refused before the body is read; a body
    without one (chunked) is counted as it arrives and refused once it passes the limit.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            length = None
        if length is not None and length > self.limit:
            await _answer(too_large(self.limit))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a starlette HTTPException passes FastAPI's body parsing unchanged
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, counted, send)


def install(app: FastAPI) -> None:
    """Register the handlers that give every error response OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return _answer(error)

    @app.exception_handler(SumfleetError)
    async def _sumfleet_error(_: Request, error: SumfleetError) -> JSONResponse:
        return _answer(sumfleet_error(error))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        if problems and problems[0].get("type") == "json_invalid":
            reason = (problems[0].get("ctx") or {}).get("error", "malformed")
            position = problems[0].get("loc", ("body", "?"))[-1]
            return _answer(
                ApiError(422, f"the body is not valid JSON ({reason} at character {position})", code="invalid_json")
            )
        messages = []
        for problem in problems[:10]:
            where = _location(tuple(problem.get("loc", ())))
            messages.append(f"{where}: {problem.get('msg', 'invalid')}")
        if len(problems) > 10:
            messages.append(f"... and {len(problems) - 10} more")
        first = problems[0] if problems else {}
        missing = first.get("type") == "missing"
        return _answer(
            ApiError(
                422,
                "; ".join(messages) or "invalid request",
                param=_location(tuple(first.get("loc", ()))) if first else None,
                code="missing_required_parameter" if missing else "invalid_value",
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        status = error.status_code
        message = str(error.detail)
        code = None
        if status == 413:
            return _answer(too_large(request.app.state.settings.api_max_upload_bytes))
        if status == 404:
            message = f"not found: {message}" if message != "Not Found" else "no such endpoint"
            code = "unknown_url"
        elif status == 405:
            code = "method_not_allowed"
        return _answer(ApiError(status, message, code=code, headers=getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return _answer(ApiError(500, f"internal error: {type(error).__name__}", code="internal_error"))
