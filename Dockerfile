# Invariance audit service on a CUDA runtime (onnxruntime-gpu / torch use the GPU when run with --gpus all).
# Install and start use the very commands CI and developers use (`make install`, the Makefile's `run`
# command); tests/test_service_packaging.py checks that they stay identical.
# The container binds 0.0.0.0, so `serve` refuses to start without tokens: pass AUDIT_TOKENS or mount a
# file and set AUDIT_TOKENS_FILE (README, "Authentication").
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    AUDIT_DATA_DIR=/data AUDIT_HOST=0.0.0.0 AUDIT_PORT=8000
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make ca-certificates libseccomp2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 audit \
 && mkdir -p /app /data && chown audit:audit /app /data

WORKDIR /app
COPY --chown=audit:audit . /app
USER audit
RUN make install

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["/app/.venv/bin/audit-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
