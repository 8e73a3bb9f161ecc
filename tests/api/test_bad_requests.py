"""Bad requests get OpenAI's error shape with the documented status, code and message.

A bad line of a batch input file fails the batch the OpenAI way: the batch is created with
status `failed` and `errors.data` listing `{code, message, param, line}`; nothing runs.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from models.settings import Settings
from tests.api.conftest import jsonl, request_line

pytestmark = pytest.mark.services


def _create(sdk: openai.OpenAI, data: bytes, name: str = "input.jsonl"):
    uploaded = sdk.files.create(file=(name, data), purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def _errors(batch: Any) -> list[dict[str, Any]]:
    assert batch.status == "failed", batch
    assert batch.failed_at and batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors.object == "list"
    return [e.model_dump() for e in batch.errors.data]


GOOD = request_line("good-1", "A fine request. Two sentences.")


def test_malformed_jsonl_line(sdk: openai.OpenAI) -> None:
    data = jsonl([GOOD]) + b'{"custom_id": "x", "method": "POST",\n' + b"[1, 2]\n"
    assert _errors(_create(sdk, data)) == [
        {
            "code": "invalid_json_line",
            "line": 2,
            "param": None,
            "message": "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 37)",
        },
        {
            "code": "invalid_json_line",
            "line": 3,
            "param": None,
            "message": "line 3: expected a JSON object, got an array",
        },
    ]


def test_wrong_url(sdk: openai.OpenAI) -> None:
    bad = {**request_line("emb", "Text."), "url": "/v1/embeddings"}
    assert _errors(_create(sdk, jsonl([GOOD, bad]))) == [
        {
            "code": "invalid_url",
            "line": 2,
            "param": "url",
            "message": 'line 2: url must be "/v1/chat/completions" (the batch\'s endpoint), got "/v1/embeddings"',
        },
    ]


def test_missing_custom_id(sdk: openai.OpenAI) -> None:
    bad = request_line("x", "Text. More.")
    del bad["custom_id"]
    assert _errors(_create(sdk, jsonl([GOOD, GOOD | {"custom_id": "good-2"}, bad]))) == [
        {"code": "missing_custom_id", "line": 3, "param": "custom_id", "message": "line 3: missing custom_id"},
    ]


def test_duplicate_custom_id(sdk: openai.OpenAI) -> None:
    assert _errors(_create(sdk, jsonl([GOOD, request_line("other", "Text. More."), GOOD]))) == [
        {
            "code": "duplicate_custom_id",
            "line": 3,
            "param": "custom_id",
            "message": 'line 3: duplicate custom_id "good-1" (first at line 1)',
        },
    ]


def test_every_bad_line_is_reported_at_once(sdk: openai.OpenAI) -> None:
    rows = [
        GOOD,
        {**request_line("m", "Text."), "method": "GET"},
        request_line("other-model", "Text.", model="smollm2"),
        {"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"},
        {**request_line("n", "Text."), "custom_id": 7},
    ]
    errors = _errors(_create(sdk, jsonl(rows)))
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "invalid_method", "method"),
        (3, "mismatched_model", "body.model"),
        (4, "invalid_body", "body"),
        (5, "invalid_custom_id", "custom_id"),
    ]
    assert errors[0]["message"] == 'line 2: method must be "POST", got "GET"'
    assert errors[3]["message"] == "line 5: custom_id must be a string, got a number"


def test_unknown_model_and_empty_file(sdk: openai.OpenAI) -> None:
    errors = _errors(_create(sdk, jsonl([request_line("a", "Text.", model="gpt-4o")])))
    assert errors == [
        {
            "code": "model_not_found",
            "line": 1,
            "param": "body.model",
            "message": "line 1: model 'gpt-4o' is not served here; the models are: "
            "lead, smollm2, python:tests.api.gated_engine:make",
        }
    ]
    assert _errors(_create(sdk, b"\n\n")) == [
        {"code": "empty_file", "line": None, "param": None, "message": "the input file has no requests"}
    ]


def test_too_many_requests(sdk: openai.OpenAI, api_settings: Settings) -> None:
    rows = [request_line(f"r{i}", "Text. More.") for i in range(api_settings.api_max_documents + 1)]
    errors = _errors(_create(sdk, jsonl(rows)))
    assert errors == [
        {
            "code": "too_many_tasks",
            "line": 51,
            "param": None,
            "message": "line 51: more than 50 requests in one batch (SUMFLEET_API_MAX_DOCUMENTS)",
        }
    ]


def test_oversize_upload_is_413(sdk: openai.OpenAI, http: httpx.Client, api_settings: Settings) -> None:
    limit = api_settings.api_max_upload_bytes
    big = jsonl([request_line(f"r{i}", "x" * 1000) for i in range(100)])
    assert len(big) > limit
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.files.create(file=("big.jsonl", big), purpose="batch")
    assert refused.value.status_code == 413
    assert refused.value.body == {
        "message": f"request body too large: the limit is {limit:,} bytes (SUMFLEET_API_MAX_UPLOAD_BYTES)",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
    inline = http.post("/api/v1/batches", json={"documents": ["x" * 1000] * 70, "model": "lead"})
    assert inline.status_code == 413 and inline.json()["error"]["code"] == "request_too_large"
    assert http.get("/v1/files").json()["data"] == []  # nothing was stored


def test_create_batch_parameters(sdk: openai.OpenAI, http: httpx.Client) -> None:
    uploaded = sdk.files.create(file=("ok.jsonl", jsonl([GOOD])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as wrong_endpoint:
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    assert wrong_endpoint.value.body == {
        "message": 'endpoint must be "/v1/chat/completions" (the only endpoint this server runs), '
        "got '/v1/embeddings'",
        "type": "invalid_request_error",
        "param": "endpoint",
        "code": "unsupported_endpoint",
    }
    with pytest.raises(openai.BadRequestError) as window:
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="2d")  # type: ignore[arg-type]
    assert window.value.body["param"] == "completion_window"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert missing.value.body == {
        "message": "no file 'file-nope' for this API key",
        "type": "not_found_error",
        "param": "input_file_id",
        "code": "not_found",
    }
    with pytest.raises(openai.BadRequestError) as purpose:
        sdk.files.create(file=("ok.jsonl", jsonl([GOOD])), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as metadata:
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    assert metadata.value.body["message"] == "metadata has 17 keys; at most 16"  # type: ignore[index]

    missing_field = http.post("/v1/batches", json={"endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert missing_field.status_code == 422
    assert missing_field.json() == {
        "error": {
            "message": "input_file_id: Field required",
            "type": "invalid_request_error",
            "param": "input_file_id",
            "code": "missing_required_parameter",
        }
    }
    not_json = http.post("/v1/batches", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["error"] == {
        "message": "the body is not valid JSON (Expecting property name enclosed in double quotes at character 1)",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }
    unknown = http.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"
    cursor = http.get("/v1/batches", params={"after": "batch_nope"})
    assert cursor.status_code == 400 and cursor.json()["error"]["param"] == "after"
    nul = http.get("/v1/files/file-%00")
    assert nul.status_code == 404 and nul.json()["error"]["code"] == "not_found"


def test_native_bad_requests(http: httpx.Client) -> None:
    bad = http.post(
        "/api/v1/batches", json={"documents": ["Fine. Text.", {"id": "b", "text": ""}, {"id": 3}], "model": "lead"}
    )
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "<api>: 2 bad document(s); nothing was submitted (set skip_bad_rows to submit the rest): "
        'documents[1]: the text is empty; documents[2]: missing text: no "text" or "document" string',
        "type": "invalid_request_error",
        "param": "documents",
        "code": "invalid_documents",
    }
    model = http.post("/api/v1/batches", json={"documents": ["Fine."], "model": "../../etc"})
    assert model.status_code == 400 and model.json()["error"]["param"] == "model"
    assert model.json()["error"]["message"] == (
        "model '../../etc' is not served here; the models are: lead, smollm2, python:tests.api.gated_engine:make"
    )
    prompt = http.post(
        "/api/v1/batches", json={"documents": ["Fine."], "model": "lead", "prompt": "no placeholder {x}"}
    )
    assert prompt.status_code == 400 and prompt.json()["error"]["param"] == "prompt"
    assert "unknown placeholder {x}" in prompt.json()["error"]["message"]
    tokens = http.post("/api/v1/batches", json={"documents": ["Fine."], "max_new_tokens": 0})
    assert tokens.status_code == 422 and tokens.json()["error"]["param"] == "max_new_tokens"
    nul = http.post("/api/v1/batches", json={"documents": ["Fine.", "bad\u0000text"], "model": "lead"})
    assert nul.status_code == 400
    assert "documents[1]: the text holds a NUL character (\\u0000) at position 3" in nul.json()["error"]["message"]
    many = http.post("/api/v1/batches", json={"documents": ["x."] * 51, "model": "lead"})
    assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_documents"
    upload = http.post(
        "/api/v1/batches/upload",
        files={"file": ("docs.jsonl", b'{"id": 1, "text": "Fine."}\n{"id": 2}\nnot json\n')},
        data={"model": "lead"},
    )
    assert upload.status_code == 400
    assert upload.json()["error"]["message"] == (
        "docs.jsonl: 2 bad document(s); nothing was submitted (set skip_bad_rows to submit the rest): "
        'line 2: missing text: no "text" or "document" field; line 3: malformed JSON (Expecting value at column 1)'
    )
    empty = http.post("/api/v1/batches/upload", files={"file": ("empty.jsonl", b"")}, data={"model": "lead"})
    assert (
        empty.status_code == 400 and empty.json()["error"]["message"] == "empty.jsonl: no documents (the file is empty)"
    )
    assert http.get("/api/v1/batches").json()["data"] == []  # nothing was created
    json.dumps(bad.json())
