# syntax=docker/dockerfile:1
# One image for every tokvel service: `docker run IMAGE run gateway` (ENTRYPOINT is `tokvel`),
# `IMAGE migrate`, `IMAGE keys create --name N --tier T`. docker-compose.yml and deploy/k8s use
# it for all of them.
#
#   docker build -t tokvel .                                               # every service
#   docker build --build-arg TOKVEL_SYNC_SCOPE="--package tokvel-api-gateway" -t tokvel-gateway .
#
# The second form installs one service package (plus tokvel-common and their dependencies):
# a smaller image holding only that service's code.

# Builder and runtime must share one Python build: the venv's interpreter is a symlink to it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# uv from PyPI (its own container image lives on a registry this project does not use).
ARG UV_VERSION=0.13.9
ARG TOKVEL_SYNC_SCOPE=--all-packages

# Bytecode compiled at build time: the runtime filesystem is read-only, so it could not be
# written later. Copy, not hard links: the venv moves to another stage.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /src

# Dependencies first, from the lock file and the members' pyproject.toml only: this layer is
# rebuilt when a dependency changes, not on every code change.
# (tests/unit/test_deploy_manifests.py checks that every workspace member is listed here.)
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY services/ingestor/pyproject.toml services/ingestor/
COPY services/velocity/pyproject.toml services/velocity/
COPY services/writer/pyproject.toml services/writer/
COPY services/api-gateway/pyproject.toml services/api-gateway/
COPY services/ws-broadcaster/pyproject.toml services/ws-broadcaster/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace ${TOKVEL_SYNC_SCOPE}

# Then the code. --no-editable: the packages are installed into the venv as wheels, so the
# runtime stage needs /app/.venv and nothing of /src.
COPY libs libs
COPY services services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable ${TOKVEL_SYNC_SCOPE}

# ---------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# A fixed uid/gid (10001): Kubernetes' runAsUser and volume ownership refer to it by number.
# /var/lib/tokvel is the one writable place (the velocity worker's table data); on Kubernetes
# an emptyDir is mounted there, and a new named volume in compose inherits this ownership.
RUN groupadd --system --gid 10001 tokvel \
    && useradd --system --uid 10001 --gid tokvel --home-dir /var/lib/tokvel \
        --shell /usr/sbin/nologin tokvel \
    && mkdir -p /var/lib/tokvel \
    && chown tokvel:tokvel /var/lib/tokvel

# Owned by root and read-only to the service user: a compromised service cannot rewrite code.
COPY --from=builder /app/.venv /app/.venv
COPY deploy/docker/healthcheck.py /usr/local/bin/tokvel-healthcheck

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/tokvel

WORKDIR /var/lib/tokvel
USER 10001:10001

# gateway, ws, cmc-replay, ingestor ops, writer ops, velocity ops
EXPOSE 8080 8081 8090 8091 8092 8093

# /healthz of whichever service runs here (the script tries each default port; compose and
# Kubernetes name the exact one). python, because the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/tokvel-healthcheck"]

ENTRYPOINT ["tokvel"]
CMD ["--help"]
