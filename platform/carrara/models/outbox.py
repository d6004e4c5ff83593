"""The transactional outbox: messages written in the same transaction as the change they announce.

A row is committed with the change, then a relay delivers it (a Kafka record, or a Celery task)
and marks it published. If Kafka or Redis is down, the row waits; nothing is lost.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from carrara.models.base import Base


class OutboxMessage(Base):
    __tablename__ = "outbox_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # "kafka": produce `payload` to `destination` with `key`; "celery": send task `destination`.
    kind: Mapped[str] = mapped_column(String(10))
    destination: Mapped[str] = mapped_column(String(249))
    key: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    headers: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
