"""The control plane's ASGI application: `uvicorn carrara.main:app`."""

from __future__ import annotations

from fastapi import FastAPI

from carrara import __version__
from carrara.health.router import router as health_router
from carrara.logging_setup import configure_logging
from carrara.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    app = FastAPI(
        title="Carrara",
        version=__version__,
        description="Kafka-native ML platform: datasets, training runs, models and deployments.",
    )
    app.include_router(health_router)
    return app


app = create_app()
