# The nexusgen-batch image: every service of docker-compose.yml runs a `nexusgen` command from it.
# torch comes from PyPI with its CUDA runtime libraries; the host needs the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY core core
COPY api api
COPY worker worker
COPY model model
COPY nexusgen nexusgen
COPY migrations migrations
RUN pip install "torch>=2.13,<2.15" && pip install . \
    && DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.18,<0.20"

RUN useradd --create-home --uid 10001 nexusgen && mkdir -p /state /models && chown nexusgen /state
USER nexusgen
VOLUME ["/state"]
EXPOSE 8080 5555
CMD ["nexusgen", "--help"]
