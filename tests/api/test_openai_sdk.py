"""The official `openai` package as the client of a real `sumfleet api` and a real worker.

Everything goes through the SDK's own calls: files.create / retrieve / content,
batches.create / retrieve / list / cancel.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import update

from models.settings import Settings
from models.tables import ApiBatch
from models.text import lead
from producer.client import Client
from tests.api.conftest import GATED, jsonl
from tests.api.conftest import request_line as _request_line
from tests.conftest import sumfleet, wait_for

pytestmark = pytest.mark.services


def request_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return _request_line(custom_id, text, model=GATED, **body)  # the worker serves the gated test engine


def _lines(content: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.text.splitlines()]


def _ended(sdk: openai.OpenAI, batch_id: str, timeout: float = 120):
    ended = ("completed", "failed", "expired", "cancelled")
    return wait_for(
        lambda: (b := sdk.batches.retrieve(batch_id)).status in ended and b, timeout, f"batch {batch_id} to end"
    )


def _underlying(settings: Settings, api_batch_id: str) -> tuple[Client, str]:
    client = Client(settings, migrate=False)
    with client.sessions() as session:
        record = session.get(ApiBatch, api_batch_id)
        assert record is not None and record.batch_id is not None
        return client, record.batch_id


def test_upload_create_poll_and_download_output_and_error_files(
    sdk: openai.OpenAI, api_settings: Settings, start_worker
) -> None:
    start_worker(api_settings, GATED)
    texts = {
        "doc-1": "Alpha opens the story. Alpha goes on. Alpha ends it. Alpha is cut.",
        "doc-2": "Beta one! Beta two? Beta three.",
        "doc-3": "FAIL this request. The engine refuses it.",
    }
    rows = [
        request_line("doc-1", texts["doc-1"], max_tokens=64, temperature=0),
        request_line("doc-2", texts["doc-2"], max_completion_tokens=2),
        request_line("doc-3", texts["doc-3"]),
        request_line("doc-4", "A fine text. But max_tokens is not.", max_tokens=0),
        {
            "custom_id": "doc-5",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": GATED,
                "messages": [
                    {"role": "system", "content": "You summarize."},
                    {"role": "user", "content": "Not this one. It is earlier."},
                    {"role": "assistant", "content": "Fine."},
                    {"role": "user", "content": [{"type": "text", "text": "Gamma first. Gamma second."}]},
                ],
            },
        },
    ]
    data = jsonl(rows)
    uploaded = sdk.files.create(file=("requests.jsonl", data), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.filename, uploaded.bytes) == (
        "file",
        "batch",
        "requests.jsonl",
        len(data),
    )
    assert uploaded.id.startswith("file-")
    assert sdk.files.retrieve(uploaded.id).bytes == len(data)
    assert sdk.files.content(uploaded.id).content == data

    created = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "nightly"},
    )
    assert created.object == "batch" and created.id.startswith("batch_")
    assert created.status == "in_progress" and created.model == GATED and created.metadata == {"run": "nightly"}
    assert created.request_counts.total == 5
    assert created.expires_at - created.created_at == 24 * 3600
    assert created.errors is None

    done = _ended(sdk, created.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 3, 2)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.completed_at >= done.created_at
    assert done.output_file_id and done.error_file_id

    output = _lines(sdk.files.content(done.output_file_id))
    by_id = {line["custom_id"]: line for line in output}
    assert [line["custom_id"] for line in output] == ["doc-1", "doc-2", "doc-5"]  # input order
    expected = {
        "doc-1": lead(texts["doc-1"], 3),
        "doc-2": lead(texts["doc-2"], 3),
        "doc-5": "Gamma first. Gamma second.",
    }
    for custom_id, summary in expected.items():
        line = by_id[custom_id]
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == GATED
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": summary, "refusal": None}
        usage = body["usage"]
        assert usage["completion_tokens"] == len(summary.split())  # the lead engine counts words
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert by_id["doc-1"]["response"]["body"]["choices"][0]["finish_reason"] == "stop"
    assert by_id["doc-2"]["response"]["body"]["choices"][0]["finish_reason"] == "length"  # 6 words >= 2 tokens
    assert done.usage.output_tokens == sum(by_id[c]["response"]["body"]["usage"]["completion_tokens"] for c in expected)

    errors = {line["custom_id"]: line for line in _lines(sdk.files.content(done.error_file_id))}
    assert set(errors) == {"doc-3", "doc-4"}
    failed = errors["doc-3"]["response"]
    assert failed["status_code"] == 500
    assert failed["body"]["error"]["message"] == "the test engine was asked to FAIL this request"
    assert failed["body"]["error"]["code"] == "generation_failed"
    refused = errors["doc-4"]["response"]
    assert refused["status_code"] == 400
    assert refused["body"]["error"] == {
        "message": "line 4: max_tokens must be an integer between 1 and 4096, got 0",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "invalid_value",
    }

    out_file = sdk.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes == len(sdk.files.content(done.output_file_id).content)
    assert sdk.files.content(done.output_file_id).content == sdk.files.content(done.output_file_id).content  # stable


def _held_batch(sdk: openai.OpenAI, settings: Settings, start_worker, gate: Path, prefix: str, window: str = "24h"):
    """A batch of 8 requests whose first chunk (4) is held running by the gated engine until `gate` exists."""
    start_worker(settings, GATED)
    rows = [request_line(f"{prefix}-0", f"WAIT:{gate} Held first. Then more.")]
    rows += [request_line(f"{prefix}-{i}", f"Request {i} first sentence. Second sentence.") for i in range(1, 8)]
    uploaded = sdk.files.create(file=(f"{prefix}.jsonl", jsonl(rows)), purpose="batch")
    # completion_window: the SDK's type allows "24h" only; this server takes any "<N>h" up to 168h
    batch = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )
    client, batch_id = _underlying(settings, batch.id)
    wait_for(lambda: client.status(batch_id).counts.get("running") == 4, 60, "the first chunk to be held running")
    return batch, client, batch_id


def test_cancel_a_running_batch_keeps_finished_results(
    sdk: openai.OpenAI, api_settings: Settings, start_worker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    batch, client, batch_id = _held_batch(sdk, api_settings, start_worker, gate, "c")

    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at  # its first chunk is still running
    assert sdk.batches.retrieve(batch.id).status == "cancelling"
    gate.touch()
    done = _ended(sdk, batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 4, 4)
    assert [line["custom_id"] for line in _lines(sdk.files.content(done.output_file_id))] == [
        "c-0",
        "c-1",
        "c-2",
        "c-3",
    ]
    errors = _lines(sdk.files.content(done.error_file_id))
    assert [line["custom_id"] for line in errors] == ["c-4", "c-5", "c-6", "c-7"]
    assert all(line["response"] is None and line["error"]["code"] == "batch_cancelled" for line in errors)
    again = sdk.batches.cancel(batch.id)  # cancelling a cancelled batch changes nothing
    assert again.status == "cancelled"
    assert client.status(batch_id).counts == {"succeeded": 4, "cancelled": 4}


def test_a_batch_cancelled_with_the_cli_ends_cancelled(
    sdk: openai.OpenAI, api_settings: Settings, start_worker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    batch, _, batch_id = _held_batch(sdk, api_settings, start_worker, gate, "k")
    cancelled = sumfleet("cancel", batch_id, settings=api_settings)
    assert cancelled.returncode == 0, cancelled.stderr.decode()
    wait_for(lambda: sdk.batches.retrieve(batch.id).status == "cancelling", 30, "the API to see the cancel")
    gate.touch()
    done = _ended(sdk, batch.id)
    assert done.status == "cancelled"
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 4)


def test_cancel_an_ended_batch_is_refused(sdk: openai.OpenAI, api_settings: Settings, start_worker) -> None:
    start_worker(api_settings, GATED)
    uploaded = sdk.files.create(file=("one.jsonl", jsonl([request_line("x", "Only. One.")])), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert _ended(sdk, batch.id).status == "completed"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.batches.cancel(batch.id)
    assert refused.value.body["message"] == f"cannot cancel batch {batch.id}: it is completed"  # type: ignore[index]


def test_a_batch_past_its_completion_window_expires(
    sdk: openai.OpenAI, api_settings: Settings, start_worker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    batch, client, batch_id = _held_batch(sdk, api_settings, start_worker, gate, "e", window="1h")
    assert batch.expires_at - batch.created_at == 3600

    with client.sessions.begin() as session:  # the hour has passed
        session.execute(
            update(ApiBatch).where(ApiBatch.id == batch.id).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    wait_for(lambda: client.status(batch_id).counts.get("cancelled") == 4, 30, "the queued requests to be cancelled")
    assert sdk.batches.retrieve(batch.id).status == "finalizing"  # waiting for the running chunk
    gate.touch()
    done = _ended(sdk, batch.id)
    assert done.status == "expired" and done.expired_at and done.completed_at is None
    assert [line["custom_id"] for line in _lines(sdk.files.content(done.output_file_id))] == [
        "e-0",
        "e-1",
        "e-2",
        "e-3",
    ]
    errors = _lines(sdk.files.content(done.error_file_id))
    assert [line["custom_id"] for line in errors] == ["e-4", "e-5", "e-6", "e-7"]
    assert all(line["error"]["code"] == "batch_expired" and line["response"] is None for line in errors)


def test_list_pages_through_this_keys_batches_newest_first(sdk: openai.OpenAI) -> None:
    uploaded = sdk.files.create(file=("list.jsonl", jsonl([request_line("a", "One. Two.")])), purpose="batch")
    made = [
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    first = sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more is True
    assert [b.id for b in sdk.batches.list(limit=2, after=first.data[-1].id).data] == [made[0]]
    assert [b.id for b in sdk.batches.list(limit=1)] == made[::-1]  # the SDK's auto-paging follows `after`
    for batch_id in made:
        sdk.batches.cancel(batch_id)


def test_delete_a_file(sdk: openai.OpenAI, api_settings: Settings, start_worker) -> None:
    start_worker(api_settings, GATED)
    uploaded = sdk.files.create(file=("gone.jsonl", jsonl([request_line("d", "Kept. Still.")])), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deleted = sdk.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        sdk.files.delete(uploaded.id)  # once only
    assert uploaded.id not in [f.id for f in sdk.files.list()]
    done = _ended(sdk, batch.id)  # the batch made from it runs on: its requests are jobs already
    assert done.status == "completed" and done.request_counts.completed == 1
    assert sdk.files.delete(done.output_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.content(done.output_file_id)
