"""Training runs: a dataset version + algorithm + params, and their lifecycle."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from carrara.models.base import Base, TimestampMixin
from carrara.models.datasets import DatasetVersion
from carrara.models.feature_sets import FeatureSetRevision

RUN_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES = ("succeeded", "failed", "cancelled")


class TrainingRun(TimestampMixin, Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"), index=True)
    algorithm: Mapped[str] = mapped_column(String(50))
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    holdout: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    registered_model_name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    events_replayed: Mapped[int] = mapped_column(BigInteger, default=0)
    events_total: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_url: Mapped[str | None] = mapped_column(String(500))
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", use_alter=True)
    )
    # Worker bookkeeping: which worker holds the run, how many times it was started (a run whose
    # worker died is re-queued until MAX_ATTEMPTS), and structured results beyond flat metrics
    # (bad-event sample, AutoML leaderboard, ONNX parity).
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    results: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_by: Mapped[str] = mapped_column(String(100), default="")

    # The dataset's feature-set revision when the run was created (None: raw fields only).
    feature_set_revision_id: Mapped[int | None] = mapped_column(
        ForeignKey("feature_set_revisions.id")
    )

    dataset_version: Mapped[DatasetVersion] = relationship()
    feature_set_revision: Mapped[FeatureSetRevision | None] = relationship()
