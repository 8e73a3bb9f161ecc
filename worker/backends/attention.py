"""Attention for decoding steps in bf16 on the CPU, registered with transformers under its own name.

torch's `scaled_dot_product_attention` runs a decoding step (one query per row, keys and values in
the static cache) through its CPU flash kernel, which read the cache at about 5 GB/s on a machine
whose memory gives 30: 56% of the transformers engine's decoding time on an AMD EPYC with
AVX-512 BF16 (README: Engines, bench/where_time_goes.py). Two batched bf16 matrix products with the
softmax between them, as transformers' own eager attention computes it (scores in bf16, the softmax
in float32), read the cache near the memory's speed. Each key/value head's query heads go in one
product (grouped-query attention without copying keys and values). Measured through the engine (24
BBC articles, 48 new tokens, 2 cores, three interleaved pairs): decoding attention 2.4-3.3 s against
4.6-4.8 s, the runs 17.2-19.8 s against 20.8-22.9 s. In float32 the two were as fast, so only bf16
models use it. Everything else (prompts, several queries a row, no mask, a per-head mask) goes to
transformers' `sdpa_attention_forward` unchanged, with the same masks (`sdpa_mask`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DECODE_ATTENTION = "sumfleet_decode"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [batch, heads, queries, dim], key and value [batch,
    kv heads, positions, dim], a boolean mask [batch, 1, queries, positions] (True: attend); returns
    [batch, queries, heads, dim]."""
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    if (
        queries != 1
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.shape[1] != 1
        or heads % kv_heads
        or value.shape[-1] != dim
        or dropout
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else dim**-0.5
    # head h of the query belongs to key/value head h // (heads // kv_heads), as transformers' repeat_kv has it
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim) * scale
    scores = torch.matmul(grouped, key.transpose(-1, -2))  # [batch, kv heads, its query heads, positions]
    scores.masked_fill_(~attention_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(weights, value).reshape(batch, 1, heads, dim), None


def use_decode_attention(model: Any) -> bool:
    """Switch `model` (a bf16 causal LM on the CPU running transformers' SDPA attention) to
    `decode_attention`. Returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.dtype != torch.bfloat16:
        return False
    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(DECODE_ATTENTION)
    except (ValueError, AttributeError):  # a model that takes no attention function by name keeps SDPA
        return False
    return model.config._attn_implementation == DECODE_ATTENTION
