"""The native summarization endpoints under `/api/v1`: the same batches `sumfleet submit` makes.

POST /api/v1/batches                documents inline (JSON)
POST /api/v1/batches/upload         a JSONL (or CSV/TSV) file, multipart, streamed to the database
GET  /api/v1/batches                newest first, `after`/`limit` pages
GET  /api/v1/batches/{id}           state, counts, docs/s, ETA, timestamps
GET  /api/v1/batches/{id}/results   result rows as JSON Lines, streamed (bounded memory)
POST /api/v1/batches/{id}/cancel    queued documents never run, running ones finish
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from models.errors import InputError, InvalidTransition, NotPublished, RowProblem, SumfleetError
from models.tables import ApiBatch, ApiKey
from producer.api import limits, service
from producer.api.auth import current_key
from producer.api.checks import check_callback_url, check_model, listed, storable_name, unstorable
from producer.api.errors import ApiError, error_responses, sumfleet_error
from producer.api.schemas import SummaryBatch, SummaryBatchList, SummaryCreate, SummaryCreated, SummaryOptions
from producer.inputs import Document, python_documents, read_documents

router = APIRouter(prefix="/api/v1", tags=["summaries"], responses=error_responses(401, 422, 429))

JSONL = "application/x-ndjson"
SHOWN_PROBLEMS = 20  # bad documents listed in an error message
IDEMPOTENCY_HELP = "a retry with the same key (per API key) returns the first batch instead of creating another"


def _limited(documents: Iterable[Document], limit: int) -> Iterator[Document]:
    for number, document in enumerate(documents, start=1):
        if number > limit:
            raise ApiError(
                413,
                f"more than {limit:,} documents in one batch (SUMFLEET_API_MAX_DOCUMENTS)",
                param="documents",
                code="too_many_documents",
            )
        yield document


def _where(problem: RowProblem, inline: bool) -> str:
    if problem.line is None:
        return problem.source
    return f"documents[{problem.line - 1}]" if inline else f"line {problem.line}"


def _problems_message(problems: list[RowProblem], inline: bool, what: str) -> str:
    shown = "; ".join(f"{_where(p, inline)}: {p.reason}" for p in problems[:SHOWN_PROBLEMS])
    more = f"; ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return (
        f"{what}: {len(problems)} bad document(s); nothing was submitted (set skip_bad_rows to submit the rest): "
        f"{shown}{more}"
    )


def _create(
    request: Request,
    key: ApiKey,
    documents: Iterable[Document],
    problems: list[RowProblem],
    *,
    source: str,
    options: SummaryOptions,
    inline: bool,
    idempotency_key: str | None,
    count: int | None = None,
) -> dict[str, Any]:
    state = request.app.state
    client, settings = state.client, state.settings
    if idempotency_key is None:  # a retry must still get its first batch, whatever the quotas say now
        limits.precheck(client.sessions, key.id, settings, documents=count)  # 429 before any work
    model = check_model(options.model, settings, state.models)
    callback_url = check_callback_url(options.callback_url, allow_private=settings.api_webhook_private)
    if options.prompt is not None and (problem := unstorable(options.prompt)):
        raise ApiError(400, f"prompt {problem}", param="prompt", code="invalid_prompt")
    try:
        submission = service.create_native_batch(
            client,
            key.id,
            _limited(documents, settings.api_max_documents),
            problems,
            source=source,
            options=options,
            model=model,
            callback_url=callback_url,
            idempotency_key=None if idempotency_key is None else f"{key.id}/{idempotency_key}",
        )
    except NotPublished as saved:  # committed, so it runs: answer with the batch, never a 5xx a caller would retry
        created = service.batch_object(client.sessions, saved.batch_id)
        skipped = [f"{_where(p, inline)}: {p.reason}" for p in saved.problems]
        return {**created, "accepted": saved.accepted, "skipped": skipped}
    except InputError as error:
        param = "documents" if inline else "file"
        if problems and not options.skip_bad_rows:
            raise ApiError(
                400, _problems_message(problems, inline, source), param=param, code="invalid_documents"
            ) from None
        message = str(error).replace("<stdin>", source)
        if problems:
            message = f"{source}: no usable documents: " + "; ".join(
                f"{_where(p, inline)}: {p.reason}" for p in problems[:SHOWN_PROBLEMS]
            )
        raise ApiError(400, message, param=param, code="invalid_documents") from None
    except SumfleetError as error:
        raise sumfleet_error(error) from None
    created = service.batch_object(client.sessions, submission.batch_id)
    skipped = [f"{_where(p, inline)}: {p.reason}" for p in submission.problems]
    return {**created, "accepted": submission.accepted, "skipped": skipped}


@router.post(
    "/batches",
    status_code=201,
    response_model=SummaryCreated,
    summary="Create a batch (documents inline)",
    responses=error_responses(400, 413, 422, 503),
)
def create_inline(
    request: Request,
    body: SummaryCreate,
    key: ApiKey = Depends(current_key),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_HELP),
) -> dict[str, Any]:
    problems: list[RowProblem] = []
    settings = request.app.state.settings
    if len(body.documents) > settings.api_max_documents:
        raise ApiError(
            413,
            f"{len(body.documents):,} documents; the limit is {settings.api_max_documents:,} per batch "
            "(SUMFLEET_API_MAX_DOCUMENTS)",
            param="documents",
            code="too_many_documents",
        )
    documents = python_documents(body.documents, problems, settings.max_document_chars)
    return _create(
        request,
        key,
        documents,
        problems,
        source="<api>",
        options=body,
        inline=True,
        idempotency_key=idempotency_key,
        count=len(body.documents),
    )


@router.post(
    "/batches/upload",
    status_code=201,
    response_model=SummaryCreated,
    summary="Create a batch from an uploaded JSONL, CSV or TSV file",
    responses=error_responses(400, 413, 422, 503),
)
def create_upload(
    request: Request,
    file: UploadFile = File(
        description="JSON Lines (text in `text` or `document`, optional `id`), or CSV/TSV with a header"
    ),
    model: str | None = Form(None),
    prompt: str | None = Form(None),
    max_new_tokens: int | None = Form(None),
    language: str | None = Form(None),
    max_words: int | None = Form(None),
    long_documents: str | None = Form(None),
    trim: str | None = Form(None),
    callback_url: str | None = Form(None),
    adapter: str | None = Form(None),
    skip_bad_rows: bool = Form(False),
    text_field: str | None = Form(None, description="JSON key or CSV column of the text"),
    id_field: str | None = Form(None, description="JSON key or CSV column of the id (then required in every row)"),
    key: ApiKey = Depends(current_key),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_HELP),
) -> dict[str, Any]:
    try:
        options = SummaryOptions(
            model=model,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            language=language,
            max_words=max_words,
            long_documents=long_documents,
            trim=trim,
            callback_url=callback_url,
            adapter=adapter,
            skip_bad_rows=skip_bad_rows,
        )
    except ValueError as error:  # pydantic's ValidationError: the same 422 as a JSON body's
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError(getattr(error, "errors", list)()) from None
    name = storable_name(file.filename or "upload.jsonl")[:512]
    lowered = name.lower()
    fmt = "csv" if lowered.endswith(".csv") else "tsv" if lowered.endswith(".tsv") else "jsonl"
    settings = request.app.state.settings
    problems: list[RowProblem] = []
    try:
        documents = read_documents(
            "-",
            problems,
            fmt=fmt,
            text_field=text_field,
            id_field=id_field,
            max_chars=settings.max_document_chars,
            stdin=file.file,
        )
    except InputError as error:
        raise ApiError(400, str(error).replace("<stdin>", name), param="file", code="invalid_documents") from None
    return _create(
        request, key, documents, problems, source=name, options=options, inline=False, idempotency_key=idempotency_key
    )


@router.get(
    "/batches",
    response_model=SummaryBatchList,
    summary="List batches, newest first",
    responses=error_responses(400, 422),
)
def list_summary_batches(
    request: Request,
    after: str | None = Query(None, description="a batch id: list the batches created before it"),
    limit: int = Query(20, ge=1, le=100),
    key: ApiKey = Depends(current_key),
) -> dict[str, Any]:
    found = service.batch_page(request.app.state.client.sessions, key.id, "native", after=after, limit=limit)
    return listed(found, after)


def _owned(request: Request, key: ApiKey, batch_id: str) -> ApiBatch:
    """The key's native batch `batch_id`, or 404."""
    record = service.owned_batch(request.app.state.client.sessions, key.id, batch_id, "native")
    if record is None or record.batch_id is None:
        raise ApiError(404, f"no batch {batch_id!r} for this API key", code="not_found")
    return record


def _render(request: Request, record_id: str) -> dict[str, Any]:
    """The native batch object of a record, as it is now."""
    return service.batch_object(request.app.state.client.sessions, record_id)


@router.get(
    "/batches/{batch_id}",
    response_model=SummaryBatch,
    summary="A batch: state, counts, throughput",
    responses=error_responses(404),
)
def get_summary_batch(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    return _render(request, _owned(request, key, batch_id).id)


@router.get(
    "/batches/{batch_id}/results",
    summary="Result rows as JSON Lines (streamed)",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {JSONL: {"schema": {"type": "string"}}},
            "description": "one row per document, in submission order (the `sumfleet results` fields)",
        },
        **error_responses(404),
    },
)
def results(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> StreamingResponse:
    record = _owned(request, key, batch_id)
    client = request.app.state.client
    rows = client.results(record.batch_id)  # pages of 1000 rows from the database, never the whole batch
    return StreamingResponse((json.dumps(row, ensure_ascii=False) + "\n" for row in rows), media_type=JSONL)


@router.post(
    "/batches/{batch_id}/cancel",
    response_model=SummaryBatch,
    summary="Cancel a batch",
    responses=error_responses(404, 409),
)
def cancel_summary_batch(request: Request, batch_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
    record = _owned(request, key, batch_id)
    try:
        service.cancel_native_batch(request.app.state.client, record)
    except InvalidTransition as error:
        raise ApiError(409, str(error), code="invalid_state") from None
    return _render(request, record.id)
