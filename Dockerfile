# syntax=docker/dockerfile:1
# eagle-guardrail, CPU image: `guardrail serve` (API + proxy), `guardrail worker`, `guardrail
# reference serve`, `guardrail db upgrade` all run from it.
#   docker build -t eagle-guardrail:0.1.0 .
#   docker run --rm -p 8700:8700 eagle-guardrail:0.1.0      # listens on 0.0.0.0:8700 inside
# The CUDA variant is Dockerfile.cuda. See deploy/README.md for compose and Kubernetes.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch is pinned to the CPU build, as pyproject.toml caps it: PyPI's default torch wheel is a
# multi-GB CUDA build. The CPU wheel comes from PyTorch's CPU index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/guardrail/venv
ENV PATH=/opt/guardrail/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY detectors ./detectors
COPY guardrail ./guardrail
COPY storage ./storage
COPY dashboards ./dashboards
# torch is already satisfied (the CPU build); the rest comes from PyPI
RUN pip install . && pip check \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="eagle-guardrail" \
      org.opencontainers.image.description="Hallucination guardrail sidecar for multimodal LLMs (CPU)" \
      org.opencontainers.image.licenses="MIT"
# an unprivileged user with a fixed uid (Kubernetes runAsNonRoot checks the numeric uid)
RUN groupadd --system --gid 10001 guardrail \
    && useradd --system --uid 10001 --gid guardrail --home-dir /var/lib/guardrail \
       --create-home --shell /usr/sbin/nologin guardrail
COPY --from=build /opt/guardrail/venv /opt/guardrail/venv
# a stable path to the shipped reference model, for configs that name it
RUN mkdir -p /opt/guardrail/models \
    && ln -s "$(/opt/guardrail/venv/bin/python -c 'import detectors.reference as r; print(r.MODEL_DIR)')" \
       /opt/guardrail/models/reference
ENV PATH=/opt/guardrail/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    # inside a container the sidecar listens on every interface (the laptop default is 127.0.0.1)
    GUARDRAIL_HOST=0.0.0.0 \
    GUARDRAIL_PORT=8700 \
    GUARDRAIL_LOG_FORMAT=json \
    # models are local directories only: never reach a hub, and no progress bars in logs
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /var/lib/guardrail
USER 10001:10001
EXPOSE 8700
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["guardrail", "probe", "/healthz"]
ENTRYPOINT ["guardrail"]
CMD ["serve"]
