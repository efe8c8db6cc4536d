# syntax=docker/dockerfile:1
# Invariance audit service: the production image (multi-stage).
#
# * Base: Debian bookworm's own Python 3.11, the minor version the tests run on (CI and developers: python3
#   3.11), so pip resolves the very dependency set the tests cover. No CUDA base image: the CUDA 13 user-space
#   libraries come with the wheels (torch 2.14's nvidia-* packages, onnxruntime-gpu 1.31 links libcudart.so.13).
# * GPU: run with `--gpus all` (Docker, NVIDIA Container Toolkit) or `--device nvidia.com/gpu=all` (podman, CDI);
#   the host's NVIDIA driver must be >= 580 (CUDA 13.0). An older driver, or none, runs the audits on the CPU.
# * Stages: `test` installs with `make install` exactly as CI does (`.[test]`: pytest, schemathesis, Playwright),
#   and pins what it resolved; `runtime` installs the package with only its `mlflow` extra under those pins, so
#   the final image has the tested versions and no test tools. `podman build --target test .` gives the test
#   environment (tests/test_service_packaging.py checks the stages against the Makefile and .ci/run).
# * Non-root (uid 10001); the sandbox is active inside: Landlock and seccomp (libseccomp2) need no privileges,
#   and `.ci/container-smoke` checks both, plus a TorchScript audit, which is refused where Landlock is missing.
# * The container binds 0.0.0.0, so `serve` refuses to start without tokens: pass AUDIT_TOKENS or mount a file
#   and set AUDIT_TOKENS_FILE (README, "Authentication").
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv make ca-certificates libseccomp2 \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------- the tests' set
FROM base AS test
# a CA bundle for pip behind a TLS-intercepting proxy (build-time only, never in the image): .ci/container-smoke
# passes one with AUDIT_BUILD_CA; unset by default
ARG PIP_CERT
WORKDIR /app
COPY . /app
RUN --mount=type=cache,target=/root/.cache/pip make install
RUN .venv/bin/pip freeze --exclude-editable > /app/constraints.txt

# ---------------------------------------------------------------------------------------------- runtime venv
FROM base AS runtime-venv
ARG PIP_CERT
WORKDIR /app
COPY . /src
COPY --from=test /app/constraints.txt /src/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /app/.venv \
 && /app/.venv/bin/pip install -q --upgrade pip setuptools wheel \
 && /app/.venv/bin/pip install -q -c /src/constraints.txt '/src[mlflow]' \
 && ! /app/.venv/bin/python -c "import pytest" 2>/dev/null \
 && find /app/.venv -name __pycache__ -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------- production
FROM base AS runtime
ENV AUDIT_DATA_DIR=/data AUDIT_HOST=0.0.0.0 AUDIT_PORT=8000
RUN useradd --create-home --uid 10001 audit \
 && mkdir -p /app /data && chown audit:audit /data
COPY --from=runtime-venv /app/.venv /app/.venv
WORKDIR /app
USER audit

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["/app/.venv/bin/audit-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
