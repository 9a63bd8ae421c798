# The captioning service on the CPU; the same image runs the one-shot training job
# (see docker-compose.yml). Build: docker build -t captioner .
FROM python:3.11-slim

# Build arguments pip reads, e.g. a CPU-only PyTorch wheel index as PIP_EXTRA_INDEX_URL for a
# much smaller image than the default CUDA build of torch.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/
COPY captioner captioner/
COPY service service/
# setup.sh is the one place the torch/torchvision versions are pinned.
RUN bash scripts/setup.sh serve \
    && useradd --create-home --uid 1000 captioner \
    && mkdir /models && chown captioner /models

# /models is owned by the unprivileged user, so a fresh named volume mounted there is too.
USER captioner
ENV PATH=/app/.venv/bin:$PATH \
    CAPTIONER_BIND=0.0.0.0:8000 \
    CAPTIONER_MODEL_PATH=/models/run/model.pt
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["gunicorn", "-c", "service/gunicorn.conf.py"]
