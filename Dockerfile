# syntax=docker/dockerfile:1
# The `aet serve` image: the wheel built in one stage, installed into a venv in the next, run as
# uid 1000 over the model repository mounted at /mnt/models. One file, two images:
#
#   CPU:  docker build -t ae-transfer:cpu .
#   CUDA: docker build -t ae-transfer:cuda \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#           --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#   run:  docker run --rm -p 8500:8500 -p 9100:9100 -v "$PWD/exported:/mnt/models:ro" ae-transfer:cpu
#
# onnxruntime-gpu is what the wheel requires on Linux x86_64 (pyproject.toml), so both images
# carry it; on the CPU image it finds no GPU and `aet serve --device auto` runs on the CPU. The
# CUDA base's CUDA and cuDNN majors must be the ones the installed onnxruntime-gpu was built
# for. torch (the wheel depends on it, `aet serve` never imports it) comes from the CPU index
# by default, which keeps several GB of CUDA libraries out of the CPU image.
# Lint: `make lint-docker` (hadolint). docs/deploy.md says what was and was not verified.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# .dockerignore lets in only what the wheel is built from.
COPY pyproject.toml README.md LICENSE ./
COPY aet aet
COPY training training
COPY server server
COPY clients clients
COPY proto proto
COPY exported/digits exported/digits
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The CUDA base has no Python: Ubuntu's python3 (3.12 on 24.04) then; the slim base has 3.11.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/aet \
    && (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin aet) \
    && mkdir -p /mnt/models
COPY --from=build /wheels /tmp/wheels
RUN /opt/aet/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

ENV PATH=/opt/aet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 1000:1000
WORKDIR /tmp
# gRPC (aet.v1.EmbeddingService, KServe v2, grpc.health.v1, reflection) and Prometheus /metrics.
# HTTP/REST is not served yet (issue 21); its port will be added here when it is.
EXPOSE 8500 9100
STOPSIGNAL SIGTERM
# Docker's own check (Kubernetes uses its grpc probes instead): overall health is SERVING once
# a model version is loaded and warmed up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:8500'); sys.exit(g.HealthStub(c).Check(h.HealthCheckRequest(service=''), timeout=4).status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["aet", "serve"]
# Logs are JSON lines on stderr (aet serve always logs so). --drain-seconds 2 and --grace-period
# 5: shutdown ends within 2 + 5 + 2 s, inside `docker stop`'s default 10 s; Kubernetes sets its
# own (deployment.yaml).
CMD ["--host", "0.0.0.0", "--port", "8500", "--metrics-port", "9100", "--repository", "/mnt/models", "--drain-seconds", "2", "--grace-period", "5"]
