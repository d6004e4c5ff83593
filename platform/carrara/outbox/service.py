"""Write outbox messages in the caller's transaction; the relay delivers them after commit."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from carrara.models import OutboxMessage
from carrara.settings import get_settings

PENDING_FLAG = "outbox_pending"
# Postgres channel the relays LISTEN on: a NOTIFY sent in the writing transaction reaches every
# API process at commit (never before), so a revision is relayed at once, whichever process
# wrote it.
CHANNEL = "carrara_outbox"


def _pending(session: Session) -> None:
    if not session.info.get(PENDING_FLAG):
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
    session.info[PENDING_FLAG] = True


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
    _pending(session)
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
    _pending(session)
    return message
