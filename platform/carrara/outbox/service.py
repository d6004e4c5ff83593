"""Write outbox messages in the caller's transaction; the relay delivers them after commit."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from carrara.models import OutboxMessage
from carrara.settings import get_settings

PENDING_FLAG = "outbox_pending"


def enqueue_kafka(
    session: Session,
    topic: str,
    key: str,
    payload: dict[str, Any] | None,
    headers: dict[str, str] | None = None,
) -> OutboxMessage:
    """Produce `payload` (JSON; None = tombstone) to `topic` with `key` once committed."""
    message = OutboxMessage(
        kind="kafka", destination=topic, key=key, payload=payload, headers=headers or {}
    )
    session.add(message)
    session.info[PENDING_FLAG] = True
    return message


def enqueue_task(
    session: Session,
    task_name: str,
    kwargs: dict[str, Any],
    task_id: str,
    queue: str | None = None,
) -> OutboxMessage:
    """Send Celery task `task_name` once committed, so it never sees a row that does not exist.

    The queue is fixed when the message is written (default: `CARRARA_TRAINING_QUEUE` of the
    process writing it), so whichever API process relays it, it reaches the intended workers.
    """
    message = OutboxMessage(
        kind="celery",
        destination=task_name,
        key=task_id,
        payload=kwargs,
        headers={"queue": queue or get_settings().training_queue},
    )
    session.add(message)
    session.info[PENDING_FLAG] = True
    return message
