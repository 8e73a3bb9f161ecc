"""What the machine offers, found without importing torch (a llama.cpp worker never loads it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The CPU's model name (Linux), empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX-512 BF16).

    Measured: bf16 generation ran 3.1x slower than fp32 on an AVX2-only CPU and 1.9x faster
    on one with AVX-512 BF16.
    """
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def nvidia_gpu_present() -> bool:
    """An NVIDIA device node exists (the driver is loaded); torch confirms it when it loads."""
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
