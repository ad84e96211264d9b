# syntax=docker/dockerfile:1.7
# The operator image: the API package and the kopf operator, and nothing of the ML stack
# (no torch, Ray, DeepSpeed or transformers: the `[operator]` extra only).
#   docker build -t ghcr.io/finetune-operator/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# README.m[d]: copied when present (pyproject's readme), without failing when it is not.
COPY pyproject.toml README.m[d] ./
COPY api/ api/
COPY cli/ cli/
COPY operator/ operator/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install '.[operator]'
# Fail the build, not a pod, if the ML stack ever creeps into the operator's imports.
RUN /opt/venv/bin/python -c "import sys, finetune_operator.main; \
bad = {'torch', 'ray', 'deepspeed', 'transformers'} & set(sys.modules); assert not bad, bad" \
 && /opt/venv/bin/finetune --help >/dev/null

FROM ${PYTHON_IMAGE}
# The venv is self-contained on the same base image; bytecode was compiled at install time,
# and the root filesystem is read-only at run time (only /tmp is writable, an emptyDir).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 finetune \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin finetune
COPY --from=build /opt/venv /opt/venv
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8080: kopf's liveness endpoint (/healthz); 9090: Prometheus metrics (/metrics).
EXPOSE 8080 9090
ENTRYPOINT ["finetune", "operator"]
