# syntax=docker/dockerfile:1
# One image for every warp-service process: the API (default command), the Celery worker and
# the one-shot `warp admin migrate` (see docker-compose.yml for the commands).
#
#   docker build -t warp-service .
#
# torch is installed first, from its own build args, so the (large) torch layer is cached
# independently of the project and its build can be chosen per host:
#   TORCH_SPEC       the requirement, default torch==2.13.0 (same pin as the Makefile/CI)
#   TORCH_INDEX_URL  an index to take it from, default: PyPI. On GPU hosts pass the CUDA
#                    build you want, e.g.
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#                    and, for a CPU-only image (no CUDA libraries, far smaller),
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#                    Note: on linux/x86_64 the plain PyPI wheel already bundles CUDA
#                    libraries (several GB); only the /whl/cpu index gives the CPU-only build.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Everything goes into a venv that the runtime stage copies whole.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel

# 1. torch, alone: the slowest layer, rebuilt only when TORCH_SPEC/TORCH_INDEX_URL change.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi

# 2. The project's dependencies, read from pyproject.toml: rebuilt only when it changes.
#    torch>=2.4 is already satisfied, so pip keeps the build installed above.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# 3. The project itself.
COPY warp_core ./warp_core
COPY service ./service
COPY api ./api
COPY worker ./worker
COPY client ./client
RUN pip install . \
    && cd / && python -c "import torch, api.migrate, worker.tasks, client.cli; print('torch', torch.__version__)"

# -------------------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf-cache

# A fixed, non-root uid/gid, so files on shared volumes have one owner across api and worker.
# /data/* are the mount points of the compose volumes. They exist in the image, owned by
# `warp`, so a fresh named volume mounted there inherits that ownership (otherwise it would
# be root's and the non-root processes could not write to it).
ARG APP_UID=10001
ARG APP_GID=10001
RUN groupadd --system --gid "${APP_GID}" warp \
    && useradd --system --uid "${APP_UID}" --gid warp --create-home --home-dir /home/warp \
        --shell /usr/sbin/nologin warp \
    && mkdir -p /app /data/artifacts /data/work /data/hf-cache \
    && chown -R warp:warp /data

COPY --from=build /opt/venv /opt/venv

# Everything, migrations included (`warp admin migrate`), comes from the installed package.
WORKDIR /app
USER warp

EXPOSE 8000

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
