"""Declarative deployments and their immutable revisions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from carrara.models.base import Base, TimestampMixin


class Deployment(TimestampMixin, Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    current_revision: Mapped[int] = mapped_column(Integer, default=0)
    # Set when the deployment is stopped (DELETE); a later PUT starts it again.
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    revisions: Mapped[list[DeploymentRevision]] = relationship(
        back_populates="deployment", order_by="DeploymentRevision.number"
    )


class DeploymentRevision(TimestampMixin, Base):
    __tablename__ = "deployment_revisions"
    __table_args__ = (UniqueConstraint("deployment_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    # The desired state: input/output topics, key field, pool, variants; None when stopped.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    spec_hash: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(100), default="")

    deployment: Mapped[Deployment] = relationship(back_populates="revisions")
