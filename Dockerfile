# syntax=docker/dockerfile:1
#
# One image for both roles of btd: the gateway (`btd serve`: DICOM listener, REST API, stability monitor)
# and the scoring worker (`btd worker`: Celery). The default CT model is package data of `models`, so it is
# inside the image; a site model is mounted and named by BTD_MODEL (docs/deploy.md).
#
#   CPU:  docker build -t btd:cpu .
#   CUDA: docker build --build-arg TORCH_VARIANT=cu128 -t btd:cuda .
#
# Why torch is installed on its own, from PyTorch's index: the variant (cpu, cu126, cu128, ...) is what
# makes the build CPU or CUDA, and an unpinned torch from PyPI would pull a multi-GB CUDA build into a CPU
# image. The CUDA wheels carry the CUDA runtime libraries (nvidia-* wheels), so the same slim Python base
# serves both builds; the host only needs the NVIDIA driver and the container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/btd \
    PATH=/opt/btd/bin:$PATH

RUN python -m venv /opt/btd \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The build context is an allow-list (.dockerignore): pyproject.toml and the project's Python packages, so
# a new package is one line there and none here, and nothing else (.git, .venv, tests, btd.env) comes in.
WORKDIR /src
COPY . .

# torch is already satisfied (2.13.0+cpu or +cuXXX matches ==2.13.0), so this adds only btd and the rest.
# The checks fail the build when the image would lack the default model, the migrations or the CLI.
# Then what the running service never loads goes (measured in docs/deploy.md): the packages' own test
# suites, torch's C++ headers, CMake files, test binaries and protoc (only for building extensions), and
# pip and setuptools (nothing is installed at run time).
RUN pip install --no-cache-dir . \
    && python -c "import importlib.resources as r; \
assert any(p.name.endswith('.pt') for p in r.files('models').joinpath('weights').iterdir()), 'no default model'; \
assert r.files('migrations').joinpath('env.py').is_file(), 'migrations not installed'" \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && find "$site" -depth -type d -name tests -exec rm -rf {} + \
    && find "$site/torch" -path "$site/torch/bin/*" -not -name torch_shm_manager -exec rm -rf {} + \
    && rm -rf "$site/torch/test" "$site/torch/include" "$site/torch/share" \
    && pip uninstall --yes --quiet pip setuptools \
    && python -c "import torch, scipy.ndimage, highdicom, pynetdicom, celery, fastapi, sqlalchemy" \
    && btd --help > /dev/null

# ---------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="btd" \
      org.opencontainers.image.description="PACS-integrated detector of tampered CT/MR images (Back-in-Time Diffusion)" \
      io.btd.torch-variant="${TORCH_VARIANT}"

# A fixed uid/gid, so a bind-mounted /data can be chowned on the host to match (docs/deploy.md).
RUN groupadd --system --gid 10001 btd \
    && useradd --system --uid 10001 --gid btd --home-dir /data --no-create-home --shell /usr/sbin/nologin btd \
    && mkdir -p /data \
    && chown btd:btd /data

# The whole installation: btd, its dependencies, the default model and the Alembic revisions (the
# `migrations` package, which `btd db upgrade` finds on the path).
COPY --from=builder /opt/btd /opt/btd

# Inside a container the listener and the API must listen on all interfaces; ports and the data dir are
# the contract's defaults. Set BTD_API_TOKEN in production (docs/deploy.md).
ENV VIRTUAL_ENV=/opt/btd \
    PATH=/opt/btd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BTD_DATA_DIR=/data \
    BTD_DICOM_HOST=0.0.0.0 \
    BTD_DICOM_PORT=11112 \
    BTD_HTTP_HOST=0.0.0.0 \
    BTD_HTTP_PORT=8000

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 11112 8000

# Liveness of the gateway: /healthz answers while the process serves HTTP. The worker has no HTTP port;
# compose gives it a Celery ping instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BTD_HTTP_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["btd"]
CMD ["serve"]
