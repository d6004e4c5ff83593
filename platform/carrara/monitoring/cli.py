"""`carrara-monitor`: join predictions with outcomes, aggregate live metrics, watch drift."""

from __future__ import annotations

import signal

import structlog
import typer

from carrara.logging_setup import configure_logging
from carrara.settings import Settings

app = typer.Typer(add_completion=False)
log = structlog.get_logger(__name__)


@app.command()
def main() -> None:
    """Monitor every running deployment until SIGTERM/SIGINT (scale out: run several)."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    from sqlalchemy.orm import sessionmaker

    from carrara.db import engine_for
    from carrara.monitoring.monitor import Monitor
    from carrara.streams.topics import TopicAdmin

    try:
        TopicAdmin(settings.kafka_bootstrap).create_topic(settings.alerts_topic, 1, exist_ok=True)
    except Exception as exc:  # the alerts wait in the outbox until the topic exists
        log.warning("cannot create the alerts topic", error=str(exc))
    monitor = Monitor(settings, sessionmaker(bind=engine_for(settings.database_url)))
    signal.signal(signal.SIGTERM, lambda *_: monitor.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: monitor.stop_event.set())
    log.info("monitor starting")
    monitor.run()
    log.info("monitor stopped", batches=monitor.batches)


if __name__ == "__main__":
    app()
