# syntax=docker/dockerfile:1
# layercache: one image, two entry points (`layercache operator`, `layercache agent`).
#   docker build -t ghcr.io/layercache/layercache:0.1.0 .
#   (both platforms: docker buildx build --platform linux/amd64,linux/arm64 ...; `make image`
#   builds that index without Docker or emulation, see tests/testbed/product_index.py)
# Kept step for step in line with the Docker-less build that our CI runs instead
# (tests/testbed/product_image.py, `make image`): Debian bookworm's Python 3.11 at
# /usr/bin/python3, the wheel of this checkout and its dependencies in a venv at
# /opt/layercache with no pip in it, user 65532, the same entry point, env and labels.
#
# Base images are pinned by tag only: our build machines cannot reach Docker Hub or gcr.io
# to read a digest, and a digest copied from elsewhere could not be checked. Pin them with
#   docker buildx imagetools inspect debian:bookworm-slim     (and the runtime image)
# and pass --build-arg BUILDER_IMAGE=debian:bookworm-slim@sha256:<digest> (RUNTIME_IMAGE too).
ARG BUILDER_IMAGE=debian:bookworm-slim
# distroless' Python image is Debian 12's python3 (3.11) without shell, apt or pip; the
# `nonroot` tag runs as 65532:65532 and has /home/nonroot.
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot

FROM ${BUILDER_IMAGE} AS builder
# Build tools live only in this stage: python3-venv brings ensurepip for the build venv.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# A throwaway venv holds the pip that builds and installs; Debian's own pip refuses to
# touch the system Python (PEP 668), and the product venv must not contain pip at all.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --upgrade pip
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest of the context out).
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src
# The product venv: created by the same /usr/bin/python3 the runtime image has, so its
# interpreter symlink resolves there; pip runs from the build venv (`--python`) and
# compiles bytecode now, because the running image may have a read-only root file system.
RUN python3 -m venv --without-pip /opt/layercache \
 && /opt/build/bin/pip --python /opt/layercache/bin/python install --no-cache-dir \
      /wheels/layercache-*.whl

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=""
COPY --from=builder /opt/layercache /opt/layercache
# PATH: the venv first, so the manifests' `command: [layercache]` resolves to it.
# PYTHONUNBUFFERED: log lines reach `kubectl logs` as they happen.
# PYTHONDONTWRITEBYTECODE: bytecode was compiled at build time; the root fs may be read-only.
ENV PATH=/opt/layercache/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/nonroot
# Non-root by default. The operator keeps it; the agent's securityContext runs it as root
# because the containerd socket it writes layers through is root-owned.
USER 65532:65532
WORKDIR /home/nonroot
ENTRYPOINT ["/opt/layercache/bin/layercache"]
LABEL org.opencontainers.image.title="layercache" \
      org.opencontainers.image.description="Kubernetes operator and node agent that pre-pull and de-duplicate shared container-image base layers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/layercache/layercache" \
      org.opencontainers.image.base.name="gcr.io/distroless/python3-debian12:nonroot" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
