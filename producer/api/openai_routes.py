"""The OpenAI-compatible Batch API: `/v1/files` and `/v1/batches`.

An existing OpenAI client pointed at `http://host:port/v1` works: upload a JSONL file of
`/v1/chat/completions` requests (purpose `batch`), create a batch from it, poll it, download
its output and error files. The body's `model` selects the worker queue; each request's
messages, `max_tokens` / `max_completion_tokens` and `temperature` go with its job.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from models import defaults
from models.api_store import (
    add_rejections,
    add_upload,
    delete_file,
    get_api_batch,
    get_file,
    iter_upload,
    iter_upload_lines,
    list_files,
    new_id,
    set_status,
)
from models.errors import BrokerError, InputError, SumfleetError
from models.store import utcnow
from models.tables import ApiBatch, ApiFile, ApiKey, Batch
from producer.api.auth import current_key
from producer.api.batch_input import CHAT_COMPLETIONS, BatchInput, LineError, first_model
from producer.api.checks import batch_page, check_callback_url, model_problem, page, storable_name, unknown_cursor
from producer.api.errors import ApiError, error_responses, sumfleet_error
from producer.api.lifecycle import advance, cancel_jobs, error_lines, expiry, notify, openai_objects, output_lines, unix
from producer.api.schemas import BatchCreate, BatchList, BatchObject, FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=error_responses(401, 422))

_WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
MAX_WINDOW_HOURS = 168  # a week
JSONL = "application/x-ndjson"


def _file_object(file: ApiFile) -> dict[str, Any]:
    return {"id": file.id, "object": "file", "bytes": file.size, "created_at": unix(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


def _not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no {kind} {object_id!r} for this API key", param=param, code="not_found")


# --- files ----------------------------------------------------------------------------------------


@router.post("/files", response_model=FileObject, summary="Upload a file", responses=error_responses(400, 413, 422))
def create_file(
    request: Request,
    file: UploadFile = File(description="a JSONL file of batch requests"),
    purpose: str = Form(description='must be "batch"'),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    if purpose != "batch":
        raise ApiError(400, f'purpose must be "batch" (the only purpose this server stores), got {purpose!r}',
                       param="purpose", code="invalid_value")
    client = request.app.state.client
    limit = request.app.state.settings.api_max_upload_bytes
    name = storable_name(file.filename or "upload.jsonl")[:512]

    def pieces() -> Iterator[bytes]:
        size = 0
        while data := file.file.read(defaults.API_FILE_CHUNK):
            size += len(data)
            if size > limit:
                raise ApiError(413, f"file is over {limit:,} bytes (SUMFLEET_API_MAX_UPLOAD_BYTES)", param="file",
                               code="file_too_large")
            yield data

    with client.sessions.begin() as session:
        stored = add_upload(session, key.id, name, purpose, pieces())
        return _file_object(stored)


@router.get("/files", response_model=FileList, summary="List files", responses=error_responses(400, 422))
def list_files_route(
    request: Request,
    purpose: str | None = Query(None, description="batch (uploads) or batch_output (output and error files)"),
    after: str | None = Query(None, description="a file id: list the files created before it"),
    limit: int = Query(100, ge=1, le=10_000),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    with request.app.state.client.sessions() as session:
        found = list_files(session, key.id, after=after, limit=limit, purpose=purpose)
        if found is None:
            raise unknown_cursor(after or "")
        files, more = found
        return page([_file_object(f) for f in files], more)


def _owned_file(request: Request, key: ApiKey, file_id: str) -> ApiFile:
    with request.app.state.client.sessions() as session:
        file = get_file(session, key.id, file_id)
    if file is None:
        raise _not_found("file", file_id)
    return file


@router.get("/files/{file_id}", response_model=FileObject, summary="Retrieve a file", responses=error_responses(404))
def retrieve_file(request: Request, file_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    return _file_object(_owned_file(request, key, file_id))


@router.delete("/files/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=error_responses(404))
def delete_file_route(request: Request, file_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    with request.app.state.client.sessions.begin() as session:
        if not delete_file(session, key.id, file_id):
            raise _not_found("file", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get(
    "/files/{file_id}/content",
    summary="Download a file's content",
    response_class=StreamingResponse,
    responses={200: {"content": {JSONL: {"schema": {"type": "string"}}}, "description": "the file, streamed"},
               **error_responses(404)},
)
def file_content(request: Request, file_id: str, key: ApiKey = Depends(current_key)) -> StreamingResponse:
    file = _owned_file(request, key, file_id)
    sessions = request.app.state.client.sessions
    if file.kind == "upload":
        return StreamingResponse(iter_upload(sessions, file.id), media_type=JSONL)

    def generated() -> Iterator[bytes]:
        with sessions() as session:
            record = session.get(ApiBatch, file.api_batch_id)
            if record is None:
                return
            session.expunge(record)
            lines = output_lines(session, record) if file.kind == "output" else error_lines(session, record)
            yield from lines

    return StreamingResponse(generated(), media_type=JSONL)


# --- batches --------------------------------------------------------------------------------------


def _render(request: Request, record_id: str) -> dict[str, Any]:
    with request.app.state.client.sessions() as session:
        record = session.get(ApiBatch, record_id)
        assert record is not None
        return openai_objects(session, [record])[0]


def _check_create(body: BatchCreate, allow_private: bool) -> str | None:
    if body.endpoint != CHAT_COMPLETIONS:
        raise ApiError(400, f'endpoint must be "{CHAT_COMPLETIONS}" (the only endpoint this server runs), got {body.endpoint!r}',
                       param="endpoint", code="unsupported_endpoint")
    window = _WINDOW.match(body.completion_window)
    if window is None or int(window.group(1)) > MAX_WINDOW_HOURS:
        raise ApiError(400, f'completion_window must be "24h" or another "<N>h" from 1h to {MAX_WINDOW_HOURS}h, '
                            f"got {body.completion_window!r}", param="completion_window", code="invalid_value")
    metadata = body.metadata or {}
    if len(metadata) > 16:
        raise ApiError(400, f"metadata has {len(metadata)} keys; at most 16", param="metadata", code="invalid_value")
    for name, value in metadata.items():
        if len(name) > 64 or len(value) > 512:
            raise ApiError(400, f"metadata {name[:64]!r}: keys are at most 64 characters and values at most 512",
                           param="metadata", code="invalid_value")
    if body.callback_url is not None:
        return check_callback_url(body.callback_url, allow_private=allow_private)
    if "callback_url" in metadata:
        return check_callback_url(metadata["callback_url"], "metadata.callback_url", allow_private=allow_private)
    return None


@router.post("/batches", response_model=BatchObject, summary="Create a batch",
             responses=error_responses(400, 404, 422, 503))
def create_batch(request: Request, body: BatchCreate, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    callback_url = _check_create(body, request.app.state.settings.api_webhook_private)
    state = request.app.state
    client, settings = state.client, state.settings
    with client.sessions() as session:
        file = get_file(session, key.id, body.input_file_id)
    if file is None or file.kind != "upload":
        raise _not_found("file", body.input_file_id, "input_file_id") if file is None else ApiError(
            400, f"input_file_id {body.input_file_id!r} is an output file; upload a file with purpose batch",
            param="input_file_id", code="invalid_value")

    now = utcnow()
    record_id = new_id("batch_")
    record = ApiBatch(
        id=record_id, kind="openai", owner=key.id, status="in_progress", endpoint=body.endpoint,
        input_file_id=file.id, completion_window=body.completion_window, meta=body.metadata,
        callback_url=callback_url, created_at=now, in_progress_at=now,
        expires_at=expiry(now, body.completion_window),
    )
    found = first_model(iter_upload_lines(client.sessions, file.id))
    record.model = found[1] if found else None
    reader = BatchInput(
        iter_upload_lines(client.sessions, file.id), endpoint=body.endpoint, model=record.model,
        max_requests=settings.api_max_documents, max_chars=settings.max_document_chars,
        default_max_tokens=settings.max_new_tokens,
    )
    if found is not None and (problem := model_problem(found[1], settings, state.models)) is not None:
        reader.errors.append(LineError(found[0], "model_not_found", problem, "body.model"))

    def before_commit(session, batch: Batch) -> None:  # type: ignore[no-untyped-def]
        record.batch_id = batch.id
        session.add(record)
        session.flush()
        add_rejections(session, record.id, (r.row() for r in reader.rejected))

    submitted = False
    if not reader.errors and found is not None:
        try:
            client._submit(
                reader.documents(), reader.errors, source=f"{file.filename} ({file.id})", skip_bad_rows=False,
                publish=True, model=found[1], before_commit=before_commit,
            )
            submitted = True
        except InputError:
            pass  # reported below from the reader's own lists
        except BrokerError as error:
            if record.batch_id is None:
                raise sumfleet_error(error) from None
            submitted = True  # saved: the sweeper (or `sumfleet requeue`) publishes it later
        except SumfleetError as error:
            raise sumfleet_error(error) from None
    else:
        for _ in reader.documents():  # check every line, so all errors are reported at once
            pass

    if not submitted:
        with client.sessions.begin() as session:
            record.batch_id = None
            if reader.errors or (not reader.rejected):
                errors = reader.openai_errors() or [
                    {"code": "empty_file", "message": "the input file has no requests", "param": None, "line": None}
                ]
                record.status, record.errors, record.failed_at = "failed", errors, now
                record.in_progress_at = None
                session.add(record)
                notify(session, record, "failed")
            else:  # every request was refused on its own: nothing to run, the batch ends with its error file
                session.add(record)
                session.flush()
                add_rejections(session, record.id, (r.row() for r in reader.rejected))
    if record.status != "failed":
        advance(client.sessions, record_id)
    return _render(request, record_id)


@router.get("/batches", response_model=BatchList, summary="List batches", responses=error_responses(400, 422))
def list_batches(
    request: Request,
    after: str | None = Query(None, description="a batch id: list the batches created before it"),
    limit: int = Query(20, ge=1, le=100),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    return batch_page(request, key.id, "openai", after, limit, openai_objects)


def _owned_batch(request: Request, key: ApiKey, batch_id: str) -> ApiBatch:
    with request.app.state.client.sessions() as session:
        record = get_api_batch(session, key.id, batch_id, "openai")
    if record is None:
        raise _not_found("batch", batch_id)
    return record


@router.get("/batches/{batch_id}", response_model=BatchObject, summary="Retrieve a batch", responses=error_responses(404))
def retrieve_batch(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    return _render(request, _owned_batch(request, key, batch_id).id)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject, summary="Cancel a batch",
             responses=error_responses(400, 404))
def cancel(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    """Queued requests never run; running ones finish. `cancelling` until then, then `cancelled`."""
    record = _owned_batch(request, key, batch_id)
    sessions = request.app.state.client.sessions
    if record.status in ("in_progress", "validating"):
        with sessions.begin() as session:
            if set_status(session, record.id, [record.status], "cancelling", cancelling_at=utcnow()):
                cancel_jobs(session, record.batch_id)
        advance(sessions, record.id)
    record = _owned_batch(request, key, batch_id)
    if record.status not in ("cancelling", "cancelled"):
        raise ApiError(400, f"cannot cancel batch {record.id}: it is {record.status}", param="batch_id",
                       code="invalid_state")
    return _render(request, record.id)
