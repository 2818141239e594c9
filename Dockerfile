# Steer server image.
#   CPU (default):  docker build -t steer --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU wheel index> .
#   GPU:            docker build -t steer-gpu --build-arg FLAVOR=gpu \
#                     --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 .
# torch 2.13.0+cpu is not on PyPI proper: point PIP_EXTRA_INDEX_URL (or PIP_FIND_LINKS) at
# PyTorch's CPU wheel index or a local wheel mirror for the CPU build.
# The default model is converted at build time, so the container never downloads weights.
# It runs as the unprivileged user `steer`, which owns only the cache (converted model,
# adapters); the code and the virtualenv stay root's and read-only to it. It binds 0.0.0.0
# so the port can be published: set STEER_API_KEY (steer warns loudly when it is unset).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG FLAVOR=cpu
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_FIND_LINKS=${PIP_FIND_LINKS} \
    PIP_NO_CACHE_DIR=1 \
    STEER_FLAVOR=${FLAVOR} \
    STEER_CACHE_DIR=/var/cache/steer \
    STEER_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# python3-venv for the GPU base (the slim base has its own Python); gcc for packages that build;
# libnuma and tcmalloc are what vLLM's CPU backend looks for.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc make libnuma1 \
       libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid above the base images' own users (ubuntu's is 1000), for volume permissions.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin steer

WORKDIR /opt/steer
COPY pyproject.toml README.md Makefile ./
COPY requirements ./requirements
COPY scripts ./scripts
COPY steer ./steer
RUN bash scripts/install.sh && .venv/bin/steer models prepare \
    && mkdir -p "${STEER_CACHE_DIR}/adapters" \
    && chown -R steer:steer "${STEER_CACHE_DIR}"

ENV PATH=/opt/steer/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
USER steer
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD \
    python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
# steer handles SIGTERM itself: it drains in-flight requests, then exits 0.
ENTRYPOINT ["steer", "serve"]
