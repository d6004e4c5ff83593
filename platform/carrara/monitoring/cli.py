"""`carrara-monitor`: join predictions with outcomes, aggregate live metrics, watch drift."""

from __future__ import annotations

import signal
from typing import Annotated

import structlog
import typer

from carrara.logging_setup import configure_logging
from carrara.settings import Settings

app = typer.Typer(add_completion=False)
log = structlog.get_logger(__name__)


@app.command()
def main(
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of /metrics, /healthz, /readyz (0: any free port).")
    ] = None,
) -> None:
    """Monitor every running deployment until SIGTERM/SIGINT (scale out: run several)."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    settings.check_secrets(database=True)  # the monitor uses the database, not the session key
    from sqlalchemy.orm import sessionmaker

    from carrara.db import engine_for
    from carrara.monitoring.monitor import Monitor
    from carrara.probes import serve
    from carrara.streams.topics import TopicAdmin

    try:
        TopicAdmin(settings.kafka_bootstrap, settings).create_topic(
            settings.alerts_topic, 1, exist_ok=True
        )
    except Exception as exc:  # the alerts wait in the outbox until the topic exists
        log.warning("cannot create the alerts topic", error=str(exc))
    monitor = Monitor(settings, sessionmaker(bind=engine_for(settings.database_url)))
    signal.signal(signal.SIGTERM, lambda *_: monitor.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: monitor.stop_event.set())
    server = serve(
        metrics_port if metrics_port is not None else settings.monitor_metrics_port,
        healthy=monitor.healthy,
        readiness=monitor.healthy,
        host=settings.probes_host,
    )
    log.info("monitor starting", metrics_port=server.server_address[1])
    monitor.run()
    server.shutdown()
    log.info("monitor stopped", batches=monitor.batches)


if __name__ == "__main__":
    app()
