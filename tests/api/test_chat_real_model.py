"""Chat requests through the OpenAI SDK, the API and a worker running the real default model."""

from __future__ import annotations

import json

import openai
import pytest

from models.settings import Settings
from tests.api.conftest import ApiServer, Key, jsonl, request_line
from tests.conftest import wait_for

pytestmark = [pytest.mark.services, pytest.mark.model]


def test_chat_requests_on_the_default_model(api: ApiServer, api_settings: Settings, key: Key, start_worker) -> None:
    start_worker(api_settings, "smollm2")
    article = (
        "The harbour ferry returned to service on Monday after a month of repairs to its engine. "
        "Commuters said the crossing took twenty minutes, half the time of the bus around the bay."
    )
    rows = [
        request_line("short", f"Summarize in one sentence:\n\n{article}", model="smollm2", max_tokens=8, temperature=0),
        {
            "custom_id": "system",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "max_completion_tokens": 24,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": "You write headlines."},
                    {"role": "user", "content": f"Headline for this article:\n\n{article}"},
                ],
            },
        },
        request_line("too-long", "word " * 12_000, model="smollm2", max_tokens=8),  # over the model's context
    ]
    sdk = openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0, timeout=30)
    uploaded = sdk.files.create(file=("chat.jsonl", jsonl(rows)), purpose="batch")
    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    ended = ("completed", "failed", "expired", "cancelled")
    done = wait_for(lambda: (b := sdk.batches.retrieve(batch.id)).status in ended and b, 600, "the batch", poll=1)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)

    output = {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, sdk.files.content(str(done.output_file_id)).text.splitlines())
    }
    assert set(output) == {"short", "system"}
    for custom_id, limit in (("short", 8), ("system", 24)):
        body = output[custom_id]
        choice, usage = body["choices"][0], body["usage"]
        assert body["object"] == "chat.completion" and body["model"] == "smollm2"
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
        assert 0 < usage["completion_tokens"] <= limit and usage["prompt_tokens"] > 20
        assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == limit else "stop")
    assert output["short"]["choices"][0]["finish_reason"] == "length"  # 8 tokens cannot hold a sentence

    (error,) = map(json.loads, sdk.files.content(str(done.error_file_id)).text.splitlines())
    assert error["custom_id"] == "too-long" and error["response"]["status_code"] == 500
    assert "over this model's usable context" in error["response"]["body"]["error"]["message"]
