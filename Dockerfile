# syntax=docker/dockerfile:1.7
# The platform image: one image, every service (`mlp gateway|worker|collector|api|migrate`).
# Multi-stage: the build stage turns the source into a wheel; the runtime stage installs only that
# wheel (and its dependencies) into a slim Python, and runs as an unprivileged user.
#   docker build -t mlp/inference-platform:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only what the wheel is built from (triton_models/ is packaged into ml_service; README.md is the
# project's readme). Secrets, tests and the Kubernetes files never enter the build (.dockerignore).
COPY pyproject.toml README.md ./
COPY platform/ platform/
COPY events/ events/
COPY projections/ projections/
COPY triton_models/ triton_models/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# PYTHONSAFEPATH: never put the working directory on sys.path (nothing beside the process can
# shadow a module). No bytecode writes: the root filesystem is read-only in Kubernetes.
ENV PYTHONSAFEPATH=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLP_ENVIRONMENT=production
RUN groupadd --system --gid 10001 mlp \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mlp
# The wheel is bind-mounted from the build stage, so it never becomes a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081 8082 8083
ENTRYPOINT ["mlp"]
CMD ["--help"]
