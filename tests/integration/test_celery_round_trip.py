"""A task travels through the real Redis broker to a real Celery worker process and back."""

from __future__ import annotations

import os
import uuid

from carrara.training.worker import app, echo


def test_task_round_trips_through_redis_and_a_worker_process(celery_worker_queue: str) -> None:
    nonce = uuid.uuid4().hex
    result = echo.apply_async(args=[{"nonce": nonce}], queue=celery_worker_queue)
    reply = result.get(timeout=60)
    assert reply["payload"] == {"nonce": nonce}
    assert reply["pid"] != os.getpid()  # it ran in the worker process, not in this one
    assert app.conf.task_acks_late is True
