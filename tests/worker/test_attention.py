"""Decoding steps' attention in bf16 on the CPU (worker/backends/attention.py): two bf16 products in
place of torch's SDPA kernel, the same result within bf16 rounding, and everything else left to SDPA."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from models.settings import Settings
from tests.conftest import transformers_engine
from worker.backends.attention import DECODE_ATTENTION, decode_attention
from worker.backends.base import Row


class _Layer(torch.nn.Module):
    """What transformers' attention functions read off the layer that calls them."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _inputs(rows: int, heads: int, kv_heads: int, queries: int, positions: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    # each head on a scale of its own, so a query head attending with the wrong key/value head shows
    query = torch.randn(rows, heads, queries, 64, generator=generator) * torch.arange(1, heads + 1).view(1, -1, 1, 1)
    key = torch.randn(rows, kv_heads, positions, 64, generator=generator)
    value = torch.randn(rows, kv_heads, positions, 64, generator=generator) * torch.arange(1, kv_heads + 1).view(
        1, -1, 1, 1
    )
    starts = torch.tensor([0, 5, 17, 30][:rows])  # left padding, as a call of rows of different lengths has it
    mask = (torch.arange(positions).view(1, -1) >= starts.view(-1, 1)).view(rows, 1, 1, positions)
    if queries > 1:
        mask = mask.expand(rows, 1, queries, positions) & torch.ones(queries, positions, dtype=torch.bool).tril(
            positions - queries
        )
    return query.bfloat16(), key.bfloat16(), value.bfloat16(), mask


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention in float32 with every key/value head repeated for its query heads: [rows, queries, heads, dim]."""
    groups = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(groups, dim=1)
    value = value.float().repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask, scale=0.125)
    return out.transpose(1, 2)


def test_a_decoding_step_matches_float32_attention_within_bf16_rounding() -> None:
    query, key, value, mask = _inputs(rows=4, heads=9, kv_heads=3, queries=1, positions=48)
    with torch.inference_mode():
        fast, _ = decode_attention(_Layer(3), query, key, value, mask, scaling=0.125)
        kernel, _ = sdpa_attention_forward(_Layer(3), query, key, value, mask, scaling=0.125)
    expected = _reference(query, key, value, mask)
    assert fast.shape == kernel.shape == expected.shape == (4, 1, 9, 64)
    assert fast.dtype == torch.bfloat16
    scale = expected.abs().mean().item()
    assert (fast.float() - expected).abs().mean().item() < 0.02 * scale
    assert (fast.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    # a padded position changes nothing: the same step with garbage where row 3's padding is
    spoiled_key, spoiled_value = key.clone(), value.clone()
    spoiled_key[3, :, :30], spoiled_value[3, :, :30] = 100.0, -100.0
    with torch.inference_mode():
        again, _ = decode_attention(_Layer(3), query, spoiled_key, spoiled_value, mask, scaling=0.125)
    assert torch.equal(again[3], fast[3])


def test_anything_but_a_masked_decoding_step_goes_to_sdpa_unchanged() -> None:
    layer = _Layer(3)
    query, key, value, mask = _inputs(rows=2, heads=9, kv_heads=3, queries=5, positions=24)
    with torch.inference_mode():
        for asked, given in ((query, mask), (query[:, :, :1], None)):  # prompts; a step with no mask
            fast, _ = decode_attention(layer, asked, key, value, given, scaling=0.125)
            kernel, _ = sdpa_attention_forward(layer, asked, key, value, given, scaling=0.125)
            assert torch.equal(fast, kernel)


@pytest.mark.model
def test_a_bf16_engine_decodes_through_it_with_sdpas_results(monkeypatch) -> None:
    """The bundled model in bf16 on the CPU: its decoding steps take the two products, and on the real
    keys and values of a call of rows of different lengths they give what SDPA gives, within bf16
    rounding; float32 models keep SDPA."""
    engine = transformers_engine("smollm2", Settings(database_url="sqlite://", dtype="bfloat16", max_input_tokens=256))
    backend = engine.backend
    assert backend.decode_attention and backend.model.config._attn_implementation == DECODE_ATTENTION
    seen: list[tuple[float, float]] = []

    def compared(module: Any, query: Any, key: Any, value: Any, mask: Any, **kwargs: Any) -> Any:
        fast = decode_attention(module, query, key, value, mask, **kwargs)
        if query.shape[2] == 1:
            kernel, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
            seen.append(((fast[0].float() - kernel.float()).abs().max().item(), kernel.float().abs().max().item()))
        return fast

    AttentionInterface.register(DECODE_ATTENTION, compared)
    try:
        text = "The council approved the new budget on Tuesday after a long debate about school funding. " * 6
        ids = backend.tokenizer.encode(text)
        out = backend.generate([Row(ids[:20], 6), Row(ids[:45], 6), Row(ids, 6)])
    finally:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    layers = backend.model.config.num_hidden_layers
    assert len(seen) >= 5 * layers  # every decoding step of every layer came through
    assert all(diff <= 0.05 * max(1.0, size) for diff, size in seen), max(seen)
    assert all(g.tokens for g in out)
    plain = transformers_engine("smollm2", Settings(database_url="sqlite://", dtype="float32", max_input_tokens=256))
    assert not plain.backend.decode_attention and plain.backend.model.config._attn_implementation == "sdpa"


@pytest.mark.model
def test_transformers_continuous_batching_goes_back_to_sdpa() -> None:
    """generate_batch refuses attention functions it does not know: a bf16 engine asked for continuous
    batching hands its model back to SDPA and generates."""
    engine = transformers_engine(
        "smollm2", Settings(database_url="sqlite://", dtype="bfloat16", batching="continuous", max_input_tokens=256)
    )
    backend = engine.backend
    assert backend.packs_itself and backend.decode_attention
    ids = backend.tokenizer.encode("The council approved the new budget on Tuesday after a long debate. " * 4)
    out = backend.generate([Row(ids[:20], 6), Row(ids, 6)])
    assert all(g.error is None and g.tokens for g in out)
    assert not backend.decode_attention and backend.model.config._attn_implementation == "sdpa"
