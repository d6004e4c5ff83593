"""The Celery app of the training workers (`celery -A carrara.training.worker worker`).

Tasks are acknowledged late (after they finish) and requeued if the worker dies, so a killed worker
never silently loses a task; the tasks themselves are idempotent by run id.
"""

from __future__ import annotations

import os
import socket

from celery import Celery

from carrara.settings import get_settings

settings = get_settings()
settings.check_secrets(database=True)  # workers use the database, not the session key

app = Celery(
    "carrara",
    broker=settings.redis_url,
    backend=settings.redis_url,
    include=["carrara.training.tasks"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
    task_default_queue=settings.training_queue,
    broker_transport_options={"visibility_timeout": 3600},
)


@app.task(name="carrara.diagnostics.echo")
def echo(payload: dict[str, object]) -> dict[str, object]:
    """Return `payload` with the worker that handled it: proves a worker is consuming tasks."""
    return {"payload": payload, "worker": socket.gethostname(), "pid": os.getpid()}


def ping_workers(timeout: float = 1.0) -> int:
    """Number of live workers answering a broadcast ping."""
    replies = app.control.ping(timeout=timeout) or []
    return len(replies)
