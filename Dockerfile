# One image for every Carrara process: api, worker, scorer (and the MLflow server in compose).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY platform ./platform
RUN pip install .
COPY alembic.ini ./
COPY migrations ./migrations
RUN useradd --create-home --uid 10001 carrara
USER carrara
EXPOSE 8000
CMD ["uvicorn", "carrara.main:app", "--host", "0.0.0.0", "--port", "8000"]
