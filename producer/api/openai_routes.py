"""The OpenAI-compatible Batch API: `/v1/files` and `/v1/batches`, and `/v1/models`.

An existing OpenAI client pointed at `http://host:port/v1` works: upload a JSONL file of
`/v1/chat/completions` requests (purpose `batch`), create a batch from it, poll it, download
its output and error files. The body's `model` selects the worker queue; each request's
messages, `max_tokens` / `max_completion_tokens` and `temperature` go with its job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from models import defaults
from models.broker import check_broker
from models.errors import SumfleetError
from models.model_names import canonical_model
from models.tables import ApiBatch, ApiFile, ApiKey
from producer.api import checks, service, validation
from producer.api.auth import current_key
from producer.api.batch_input import CHAT_COMPLETIONS
from producer.api.checks import check_callback_url, listed, storable_name
from producer.api.errors import ApiError, error_responses, sumfleet_error
from producer.api.lifecycle import unix
from producer.api.schemas import BatchCreate, BatchList, BatchObject, FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=error_responses(401, 422, 429))

_WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
MAX_WINDOW_HOURS = 168  # a week
JSONL = "application/x-ndjson"


def _file_object(file: ApiFile) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.size,
        "created_at": unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": unix(file.expires_at),
        "status_details": None,
    }


def _not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no {kind} {object_id!r} for this API key", param=param, code="not_found")


# --- files ----------------------------------------------------------------------------------------


@router.post("/files", response_model=FileObject, summary="Upload a file", responses=error_responses(400, 413, 422))
def create_file(
    request: Request,
    file: UploadFile = File(description="a JSONL file of batch requests"),
    purpose: str = Form(description='must be "batch"'),
    anchor: str | None = Form(
        None, alias="expires_after[anchor]", description='"created_at" (OpenAI\'s `expires_after`, as its SDK sends it)'
    ),
    seconds: str | None = Form(
        None,
        alias="expires_after[seconds]",
        description="the file expires this many seconds after its upload (3600-2592000), and is then deleted",
    ),
    expires_after: str | None = Form(
        None, description='the same as one JSON object, `{"anchor": "created_at", "seconds": N}`'
    ),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    if purpose != "batch":
        raise ApiError(
            400,
            f'purpose must be "batch" (the only purpose this server stores), got {purpose!r}',
            param="purpose",
            code="invalid_value",
        )
    settings = request.app.state.settings
    lives = _lifetime(anchor, seconds, expires_after)
    if lives is None:
        lives = settings.api_file_ttl_seconds  # the server's default (unset: kept until deleted)
    limit = settings.api_max_upload_bytes
    name = storable_name(file.filename or "upload.jsonl")[:512]

    def pieces() -> Iterator[bytes]:
        size = 0
        while data := file.file.read(defaults.API_FILE_CHUNK):
            size += len(data)
            if size > limit:
                raise ApiError(
                    413,
                    f"file is over {limit:,} bytes (SUMFLEET_API_MAX_UPLOAD_BYTES)",
                    param="file",
                    code="file_too_large",
                )
            yield data

    stored = service.store_upload(request.app.state.client.sessions, key.id, name, purpose, pieces(), lives)
    return _file_object(stored)


def _lifetime(anchor: str | None, seconds: str | None, whole: str | None) -> int | None:
    """The seconds of an upload's `expires_after` form fields (`expires_after[anchor]` and
    `expires_after[seconds]`, or one JSON `expires_after`), or None when none is given."""
    if whole is not None:
        try:
            value = json.loads(whole)
        except (ValueError, RecursionError):
            raise ApiError(
                400,
                'expires_after must be {"anchor": "created_at", "seconds": N} (JSON), or the form fields '
                "expires_after[anchor] and expires_after[seconds]",
                param="expires_after",
                code="invalid_value",
            ) from None
        return checks.expires_after(value)
    if anchor is None and seconds is None:
        return None
    return checks.expires_after({"anchor": anchor, "seconds": seconds})


@router.get("/files", response_model=FileList, summary="List files", responses=error_responses(400, 422))
def list_files_route(
    request: Request,
    purpose: str | None = Query(None, description="batch (uploads) or batch_output (output and error files)"),
    after: str | None = Query(None, description="a file id: list the files created before it"),
    limit: int = Query(100, ge=1, le=10_000),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    found = service.file_page(request.app.state.client.sessions, key.id, purpose=purpose, after=after, limit=limit)
    return listed(found, after, _file_object)


def _owned_file(request: Request, key: ApiKey, file_id: str) -> ApiFile:
    """The key's file `file_id`, or 404."""
    file = service.owned_file(request.app.state.client.sessions, key.id, file_id)
    if file is None:
        raise _not_found("file", file_id)
    return file


@router.get("/files/{file_id}", response_model=FileObject, summary="Retrieve a file", responses=error_responses(404))
def retrieve_file(request: Request, file_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    return _file_object(_owned_file(request, key, file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=error_responses(404))
def delete_file_route(request: Request, file_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    if not service.remove_file(request.app.state.client.sessions, key.id, file_id):
        raise _not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get(
    "/files/{file_id}/content",
    summary="Download a file's content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {JSONL: {"schema": {"type": "string"}}}, "description": "the file, streamed"},
        **error_responses(404),
    },
)
def file_content(request: Request, file_id: str, key: ApiKey = Depends(current_key)) -> StreamingResponse:
    file = _owned_file(request, key, file_id)
    return StreamingResponse(service.file_content(request.app.state.client.sessions, file), media_type=JSONL)


# --- batches --------------------------------------------------------------------------------------


def _render(request: Request, record_id: str) -> dict[str, Any]:
    """The OpenAI batch object of a record, as it is now."""
    return service.batch_object(request.app.state.client.sessions, record_id)


def _check_create(body: BatchCreate, allow_private: bool) -> str | None:
    if body.endpoint != CHAT_COMPLETIONS:
        raise ApiError(
            400,
            f'endpoint must be "{CHAT_COMPLETIONS}" (the only endpoint this server runs), got {body.endpoint!r}',
            param="endpoint",
            code="unsupported_endpoint",
        )
    window = _WINDOW.match(body.completion_window)
    if window is None or int(window.group(1)) > MAX_WINDOW_HOURS:
        raise ApiError(
            400,
            f'completion_window must be "24h" or another "<N>h" from 1h to {MAX_WINDOW_HOURS}h, '
            f"got {body.completion_window!r}",
            param="completion_window",
            code="invalid_value",
        )
    metadata = body.metadata or {}
    if len(metadata) > 16:
        raise ApiError(400, f"metadata has {len(metadata)} keys; at most 16", param="metadata", code="invalid_value")
    for name, value in metadata.items():
        if len(name) > 64 or len(value) > 512:
            raise ApiError(
                400,
                f"metadata {name[:64]!r}: keys are at most 64 characters and values at most 512",
                param="metadata",
                code="invalid_value",
            )
    if body.callback_url is not None:
        return check_callback_url(body.callback_url, allow_private=allow_private)
    if "callback_url" in metadata:
        return check_callback_url(metadata["callback_url"], "metadata.callback_url", allow_private=allow_private)
    return None


@router.post(
    "/batches", response_model=BatchObject, summary="Create a batch", responses=error_responses(400, 404, 422, 503)
)
def create_batch(request: Request, body: BatchCreate, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    state = request.app.state
    callback_url = _check_create(body, state.settings.api_webhook_private)
    file = service.owned_file(state.client.sessions, key.id, body.input_file_id)
    if file is None or file.kind != "upload":
        raise (
            _not_found("file", body.input_file_id, "input_file_id")
            if file is None
            else ApiError(
                400,
                f"input_file_id {body.input_file_id!r} is an output file; upload a file with purpose batch",
                param="input_file_id",
                code="invalid_value",
            )
        )
    background = validation.in_background(state.settings, file.size)
    if background:
        try:  # 503 at once when the broker is away, as for a file validated before the answer
            check_broker(state.client.app)
        except SumfleetError as error:
            raise sumfleet_error(error) from None
    record = service.open_openai_batch(state.client, state.settings, key.id, file.id, body, callback_url)
    if record is None:  # deleted or expired since it was looked up
        raise _not_found("file", body.input_file_id, "input_file_id")
    if background:
        answer = _render(request, record.id)  # `validating`: the answer does not wait for the check
        state.validator.start(record.id)
        return answer
    try:
        validation.validate(state.client, state.settings, state.models, record.id, inline=True)
    except SumfleetError as error:
        raise sumfleet_error(error) from None
    return _render(request, record.id)


@router.get("/batches", response_model=BatchList, summary="List batches", responses=error_responses(400, 422))
def list_batches(
    request: Request,
    after: str | None = Query(None, description="a batch id: list the batches created before it"),
    limit: int = Query(20, ge=1, le=100),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    found = service.batch_page(request.app.state.client.sessions, key.id, "openai", after=after, limit=limit)
    return listed(found, after)


def _owned_batch(request: Request, key: ApiKey, batch_id: str) -> ApiBatch:
    """The key's OpenAI batch `batch_id`, or 404."""
    record = service.owned_batch(request.app.state.client.sessions, key.id, batch_id, "openai")
    if record is None:
        raise _not_found("batch", batch_id)
    return record


@router.get(
    "/batches/{batch_id}", response_model=BatchObject, summary="Retrieve a batch", responses=error_responses(404)
)
def retrieve_batch(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    return _render(request, _owned_batch(request, key, batch_id).id)


@router.post(
    "/batches/{batch_id}/cancel",
    response_model=BatchObject,
    summary="Cancel a batch",
    responses=error_responses(400, 404),
)
def cancel(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    """Queued requests never run; running ones finish. `cancelling` until then, then `cancelled`."""
    service.cancel_openai_batch(request.app.state.client.sessions, _owned_batch(request, key, batch_id))
    record = _owned_batch(request, key, batch_id)
    if record.status not in ("cancelling", "cancelled"):
        raise ApiError(
            400, f"cannot cancel batch {record.id}: it is {record.status}", param="batch_id", code="invalid_state"
        )
    return _render(request, record.id)


# --- models ---------------------------------------------------------------------------------------


class ModelObject(BaseModel):
    id: str = Field(description="a model name a request's `model` may be (SUMFLEET_API_MODELS)")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds: when this API process started serving it")
    owned_by: str = "sumfleet"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


def _model_object(request: Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "sumfleet"}


@router.get("/models", response_model=ModelList, summary="List the models served here")
def list_models(request: Request, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    """The models requests may name (SUMFLEET_API_MODELS), each needing workers of its own."""
    return {"object": "list", "data": [_model_object(request, name) for name in request.app.state.models]}


@router.get(
    "/models/{model_id:path}", response_model=ModelObject, summary="Retrieve a model", responses=error_responses(404)
)
def retrieve_model(request: Request, model_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    served: list[str] = request.app.state.models
    name = model_id if model_id in served else canonical_model(model_id)
    if name not in served:
        raise ApiError(
            404,
            f"model {model_id!r} is not served here; the models are: {', '.join(served)}",
            param="model",
            code="model_not_found",
        )
    return _model_object(request, name)
