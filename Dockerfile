# One image for every Sluice service. The API, migrate and Flower use the default build;
# the GPU worker is built with `--build-arg EXTRAS=[vllm]` (docker-compose.yml does both).
FROM python:3.11-slim

# "" for the API image, "[vllm]" for the GPU worker, "[hf]" for a transformers worker.
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    SLUICE_DATA_DIR=/data

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so editing the source does not
# reinstall vLLM (gigabytes): stub packages stand in for the real ones in this layer.
COPY pyproject.toml ./
RUN mkdir -p sluice api worker \
    && touch README.md sluice/__init__.py api/__init__.py worker/__init__.py \
    && pip install ".${EXTRAS}" \
    && pip uninstall -y sluice \
    && rm -rf sluice api worker README.md build *.egg-info

# Only what the services run; the build context's .venv and data never enter the image.
COPY pyproject.toml README.m[d] alembic.ini ./
COPY sluice ./sluice
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
# A plain (not editable) install: the wheel carries migrations/, where `sluice db upgrade`
# finds it (sluice/migrate.py); dependencies are already in place.
RUN pip install --no-deps . && rm -rf build *.egg-info && mkdir -p /data /cache/huggingface \
    && useradd --system --uid 10001 --home-dir /data sluice \
    && chown -R sluice /data /cache
# Not root: the services need only their data and cache directories.
USER sluice

EXPOSE 8000
CMD ["sluice", "api", "--host", "0.0.0.0", "--port", "8000"]
