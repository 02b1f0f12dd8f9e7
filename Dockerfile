# The nexusgen-batch image: every service of docker-compose.yml and deploy/k8s runs a `nexusgen` command.
# Layers from the slowest-changing to the fastest: torch, the dependencies, deepspeed, then our source,
# so that a code change rebuilds only the last layers.
#
# CUDA: the image takes its CUDA runtime from the torch wheel of PyTorch's CUDA_TAG index (the nvidia-*
# wheels it depends on), so torch and the CUDA libraries always match; the host needs an NVIDIA driver
# for that CUDA version (cu128: driver 570 or later) and the NVIDIA container toolkit.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG CUDA_TAG=cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    # DeepSpeed never compiles ops at build or run time: the image has no compiler, and the engine
    # uses automatic tensor parallelism without kernel injection, which needs no custom op.
    DS_BUILD_OPS=0
WORKDIR /app

RUN pip install "torch==${TORCH_VERSION}+${CUDA_TAG}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"

# the dependencies of pyproject.toml, without our source (torch above already satisfies its pin)
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-build-isolation "deepspeed>=0.18,<0.20" \
    && python -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)"

COPY core core
COPY api api
COPY worker worker
COPY model model
COPY nexusgen nexusgen
COPY migrations migrations
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 nexusgen && mkdir -p /state /models && chown nexusgen /state
USER nexusgen
# /state is mounted by the services that keep state (beat, Flower); no VOLUME here: an anonymous
# volume per container would pile up at every `docker compose up`.
EXPOSE 8080 5555
CMD ["nexusgen", "--help"]
