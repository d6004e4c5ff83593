"""The latest status record of every scorer instance, as consumed from the scorer-status topic."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from carrara.models.base import Base


class ScorerInstance(Base):
    __tablename__ = "scorer_instances"

    instance_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    pool: Mapped[str] = mapped_column(String(100), index=True)
    host: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The scorer's clock: orders records of one instance (a replayed older record never wins).
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The control plane's view of when the record arrived: liveness never depends on scorer clocks.
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    interval_s: Mapped[float] = mapped_column(Float)
    stopping: Mapped[bool] = mapped_column(Boolean, default=False)
    # One dict per deployment the instance runs (streams.scorer_status.DeploymentStatus fields).
    deployments: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
