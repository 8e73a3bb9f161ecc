"""`GET /v1/models` and `GET /v1/models/{id}`: the models the API accepts, in OpenAI's shapes,
through the official SDK."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.api.conftest import GATED, ApiServer, Key

pytestmark = pytest.mark.services


def test_models_list_and_retrieve_with_the_sdk(api: ApiServer, key: Key) -> None:
    sdk = openai.OpenAI(api_key=key.secret, base_url=f"{api.url}/v1", max_retries=0)
    models = list(sdk.models.list())
    assert [model.id for model in models] == ["lead", "smollm2", GATED]  # SUMFLEET_API_MODELS, in its order
    for model in models:
        assert (model.object, model.owned_by) == ("model", "sumfleet")
        assert 1_700_000_000 < model.created <= time.time()
    assert sdk.models.retrieve("lead").model_dump() == models[0].model_dump()
    assert sdk.models.retrieve(GATED).id == GATED  # a plugin's name, colons and all

    raw = httpx.get(f"{api.url}/v1/models", headers=key.headers).json()
    assert set(raw) == {"object", "data"} and raw["object"] == "list"
    assert set(raw["data"][0]) == {"id", "object", "created", "owned_by"}

    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.models.retrieve("gpt-4o")
    assert unknown.value.body == {
        "message": f"model 'gpt-4o' is not served here; the models are: lead, smollm2, {GATED}",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("../../etc/passwd")


def test_models_need_a_key(api: ApiServer) -> None:
    for path in ("/v1/models", "/v1/models/lead"):
        refused = httpx.get(f"{api.url}{path}")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key", path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="sk-sumfleet-not-a-key", base_url=f"{api.url}/v1", max_retries=0).models.list()
