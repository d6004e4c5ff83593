"""`carrara-scorer --pool NAME`: a scorer process (one consumer-group member per deployment)."""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
from typing import Annotated

import structlog
import typer

from carrara.logging_setup import configure_logging
from carrara.settings import Settings

app = typer.Typer(add_completion=False)
log = structlog.get_logger(__name__)


@app.command()
def main(
    pool: Annotated[
        str, typer.Option(help="Serve the deployments of this scorer pool.")
    ] = "default",
    instance_id: Annotated[
        str | None, typer.Option(help="Stable id (e.g. the pod name); default: host name.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of /metrics, /healthz, /readyz.")
    ] = None,
) -> None:
    """Score the events of every deployment in POOL until SIGTERM/SIGINT."""
    # One scoring thread per deployment: native libraries must not each grab every core (OpenMP),
    # and a model load must fail within seconds when MLflow is down, not after minutes of retries.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    # MLflow must never unpickle for a scorer: Carrara reads model files itself, by format
    # (carrara.artifacts), and only versions an admin trusted may run code.
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    from carrara.probes import serve
    from carrara.scoring.model_runtime import ModelCache
    from carrara.scoring.reconciler import Reconciler

    instance = instance_id or settings.scorer_instance_id or socket.gethostname()
    reconciler = Reconciler(settings, pool, instance, ModelCache(settings.mlflow_url))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = serve(
        metrics_port if metrics_port is not None else settings.scorer_metrics_port,
        healthy=reconciler.healthy,
        readiness=reconciler.readiness,
        host=settings.probes_host,
    )
    # Every event allocates a handful of short-lived objects; with ~170k long-lived objects from
    # the imports (MLflow, ONNX Runtime) the collector's full passes cost more CPU than the
    # models (benchmarks/RESULTS.md). Freeze what exists now and collect young objects less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info(
        "scorer starting",
        pool=pool,
        instance=instance,
        delivery=settings.scorer_delivery,
        metrics_port=server.server_address[1],
    )
    reconciler.start()
    stop.wait()
    log.info("scorer stopping: finishing the batches in hand")
    reconciler.stop()
    server.shutdown()
    log.info("scorer stopped")


if __name__ == "__main__":
    app()
