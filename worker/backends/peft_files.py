"""PEFT adapters read without torch, for the llama.cpp backend (a llama.cpp worker never loads torch).

A prompt-tuning adapter's soft prompt is read as float32 vectors. A LoRA is written as llama.cpp's own
LoRA format, a GGUF file of `<base tensor>.weight.lora_a` / `.lora_b` pairs and `adapter.lora.alpha`,
which llama.cpp applies beside the base weights (`x W + scale (x A) B`, scale = alpha / rank, as PEFT's).
Two things differ from PEFT's file: the tensors take the GGUF model's names (`blk.3.attn_q`, not
`model.layers.3.self_attn.q_proj`), and the query and key projections' output rows are in the order
llama.cpp's converter put the base weights in (each head's two rotary halves interleaved, for llama.cpp's
rotary embedding), so a LoRA's B of those projections is reordered the same way.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

# a safetensors dtype -> how its little-endian bytes become float32 (bf16: the top half of a float32)
_SAFETENSORS_FLOATS = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
ADAPTER_FILE = "adapter_model.safetensors"

# PEFT's module names in a llama-architecture model -> llama.cpp's tensor names (blk.N.<name>.weight)
LLAMA_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.([a-z_]+\.[a-z_]+)\.lora_([AB])\.weight$")
# GGUF's value types and tensor types used here (ggml's GGUF_TYPE_* and GGML_TYPE_F32)
_GGUF_FLOAT32, _GGUF_STRING, _GGML_F32 = 6, 8, 0
_GGUF_ALIGNMENT = 32


def _read_matrices(path: Path, ref: str, what: str, wanted: list[str] | None) -> dict[str, np.ndarray]:
    """Float matrices of a safetensors file as float32 (`wanted`: these names; None: every tensor).
    `what` names them in errors ("soft prompt", "LoRA")."""
    found: dict[str, np.ndarray] = {}
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
            names = [name for name in header if name != "__metadata__"]
            missing = [name for name in wanted or [] if name not in header]
            if missing:
                raise LookupError(sorted(names)[:4])
            for name in wanted or names:
                kind, shape, (begin, end) = header[name]["dtype"], header[name]["shape"], header[name]["data_offsets"]
                label = what if wanted == [name] else f"{what} tensor {name}"
                if kind not in _SAFETENSORS_FLOATS or len(shape) != 2:
                    raise ValueError(f"adapter {ref}: its {label} in {path} is {kind} {shape}, not a float matrix")
                handle.seek(8 + size + begin)
                raw = np.frombuffer(handle.read(end - begin), dtype=_SAFETENSORS_FLOATS[kind])
                if raw.size != shape[0] * shape[1]:
                    raise ValueError(f"adapter {ref}: {path} is cut short ({raw.size} values for a {shape} {label})")
                values = (raw.astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else raw.astype(np.float32)
                found[name] = np.ascontiguousarray(values.reshape(shape))
    except LookupError as error:
        raise ValueError(f"adapter {ref} holds no {what} ({path} has {error.args[0]})") from None
    except (OSError, struct.error, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        if str(error).startswith(f"adapter {ref}"):
            raise
        raise ValueError(f"adapter {ref}: cannot read its {what} from {path}: {error}") from None
    return found


def read_soft_prompt(folder: Path, ref: str) -> np.ndarray:
    """The `prompt_embeddings` tensor of a PEFT prompt-tuning adapter (adapter_model.safetensors) as
    float32 [virtual tokens, width]."""
    return _read_matrices(folder / ADAPTER_FILE, ref, "soft prompt", ["prompt_embeddings"])["prompt_embeddings"]


def rotary_order(rows: np.ndarray, heads: int) -> np.ndarray:
    """A query or key projection's output rows in llama.cpp's order: each head's rows are two halves
    (transformers rotates the first half against the second); llama.cpp rotates neighbouring pairs, so
    row i of the first half and row i of the second become rows 2i and 2i + 1."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def lora_tensors(folder: Path, ref: str, heads: int, kv_heads: int) -> tuple[float, dict[str, np.ndarray]]:
    """A PEFT LoRA of a llama-architecture model as llama.cpp takes it: the alpha to store (llama.cpp
    scales by alpha / rank) and the tensors by llama.cpp's names, float32. Anything llama.cpp's LoRA
    cannot express (DoRA, biases, fully trained modules, per-module ranks, a module it has no name
    for) is refused by name."""
    config_path = folder / "adapter_config.json"
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"adapter {ref}: cannot read its LoRA configuration {config_path}: {error}") from None
    saved = config.get("modules_to_save")
    refusals = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", f"it is a {config.get('peft_type')} adapter"),
        "use_dora": (bool(config.get("use_dora")), "DoRA"),
        "bias": (config.get("bias", "none") != "none", f"trained biases (bias={config.get('bias')!r})"),
        "modules_to_save": (bool(saved), f"modules trained whole ({saved})"),
        "rank_pattern": (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "ranks or alphas per module"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "fan_in_fan_out weights"),
    }
    for key, (refused, what) in refusals.items():
        if refused:
            raise ValueError(
                f"adapter {ref}: the llama.cpp backend cannot run this LoRA: {what} ({key} in {config_path})"
            )
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(rank), llama.cpp by alpha / rank
        alpha *= math.sqrt(rank)
    found = _read_matrices(folder / ADAPTER_FILE, ref, "LoRA", None)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, values in found.items():
        match = _LORA_KEY.match(key)
        if match is None or match.group(2) not in LLAMA_MODULES:
            raise ValueError(
                f"adapter {ref}: the llama.cpp backend cannot run this LoRA: it adapts {key}; llama.cpp takes "
                f"LoRAs of {', '.join(LLAMA_MODULES)} in the model's layers"
            )
        layer, module, side = match.groups()
        pairs.setdefault(f"blk.{layer}.{LLAMA_MODULES[module]}.weight", {})[side] = values
    if not pairs:
        raise ValueError(f"adapter {ref} holds no LoRA ({folder / ADAPTER_FILE} has no lora_A / lora_B weights)")
    tensors: dict[str, np.ndarray] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            shapes = {side: list(values.shape) for side, values in pair.items()}
            raise ValueError(f"adapter {ref}: its LoRA of {name} is not an A and a B of one rank ({shapes})")
        b = pair["B"]
        if name.endswith(".attn_q.weight"):
            b = rotary_order(b, heads)
        elif name.endswith(".attn_k.weight"):
            b = rotary_order(b, kv_heads)
        tensors[name + ".lora_a"], tensors[name + ".lora_b"] = pair["A"], np.ascontiguousarray(b)
    return alpha, tensors


def write_lora_gguf(path: Path, architecture: str, alpha: float, tensors: dict[str, np.ndarray]) -> None:
    """A llama.cpp LoRA file (GGUF version 3): the base model's architecture, `general.type` adapter,
    `adapter.type` lora, `adapter.lora.alpha`, and float32 tensors (GGUF lists a tensor's dimensions
    innermost first, so a [rank, inputs] A is stored as ne = [inputs, rank])."""

    def text(value: str) -> bytes:
        encoded = value.encode()
        return struct.pack("<Q", len(encoded)) + encoded

    values = [
        ("general.architecture", _GGUF_STRING, text(architecture)),
        ("general.type", _GGUF_STRING, text("adapter")),
        ("adapter.type", _GGUF_STRING, text("lora")),
        ("adapter.lora.alpha", _GGUF_FLOAT32, struct.pack("<f", alpha)),
    ]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(values))
    head += b"".join(text(key) + struct.pack("<I", kind) + value for key, kind, value in values)
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        head += text(name) + struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}Q", *reversed(array.shape))
        head += struct.pack("<IQ", _GGML_F32, offset)
        padding = b"\0" * (-len(data) % _GGUF_ALIGNMENT)
        blobs += [data, padding]
        offset += len(data) + len(padding)
    head += b"\0" * (-len(head) % _GGUF_ALIGNMENT)
    path.write_bytes(head + b"".join(blobs))
