# One image for every Carrara process: api (+ web UI), worker, scorer, monitor, and the MLflow server.

# The web UI's pinned JS (web/package-lock.json), copied to web/static/vendor; never a CDN.
FROM node:20-slim AS web
WORKDIR /app/web
COPY web/package.json web/package-lock.json ./
COPY web/scripts ./scripts
RUN npm ci --no-audit --no-fund && npm run vendor

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Third-party packages from the lock only (pinned, hashes checked): see `make lock`.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md alembic.ini ./
COPY platform ./platform
COPY migrations ./migrations
# Editable, so the package finds web/ and alembic.ini beside it, as in a checkout.
RUN pip install --no-deps -e .
COPY web/templates ./web/templates
COPY web/static ./web/static
COPY --from=web /app/web/static/vendor ./web/static/vendor
# The stack home (.carrara) is the API's: a session key generated there when none is given.
RUN useradd --create-home --uid 10001 carrara && mkdir -p /app/.carrara && chown carrara /app/.carrara
USER carrara
EXPOSE 8000 9400
CMD ["uvicorn", "carrara.main:app", "--host", "0.0.0.0", "--port", "8000"]
