"""Monitoring state: time-bucketed aggregates per deployment variant, the outcome join, drift
counts, alerts, and the monitor's own consumer offsets (committed with the aggregates they count).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from carrara.models.base import Base

# Fixed histogram edges, so buckets from any monitor process add up.
SCORE_BINS = 20  # equal-width bins over [0, 1]; scores outside are clipped into the end bins
LATENCY_EDGES_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # + one overflow bin
# End to end (input record timestamp -> prediction record timestamp) includes queueing and lag:
# edges up to a minute, + one overflow bin. 10 and 40 ms are edges (the scorer's targets).
END_TO_END_EDGES_MS = (
    1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2500, 5000, 10_000, 30_000, 60_000
)  # fmt: skip


class VariantMetrics(Base):
    """Per deployment, variant and minute: what was scored and how it did (no row per event)."""

    __tablename__ = "variant_metrics"
    # A deployment's window ("the last hour") without walking its whole history per variant.
    __table_args__ = (Index("ix_variant_metrics_deployment_bucket", "deployment", "bucket_start"),)

    deployment: Mapped[str] = mapped_column(String(100), primary_key=True)
    variant: Mapped[str] = mapped_column(String(100), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    model_version: Mapped[int | None] = mapped_column(Integer)
    predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    dead_letters: Mapped[int] = mapped_column(BigInteger, default=0)
    score_sum: Mapped[float] = mapped_column(Float, default=0.0)
    # Counts per bin: SCORE_BINS bins over [0, 1]; len(LATENCY_EDGES_MS) + 1 latency bins
    # (in-process scoring time); len(END_TO_END_EDGES_MS) + 1 end-to-end bins, or [] (no data:
    # rows written before end-to-end latency was counted).
    score_histogram: Mapped[list[int]] = mapped_column(JSONB, default=list)
    latency_histogram: Mapped[list[int]] = mapped_column(JSONB, default=list)
    end_to_end_histogram: Mapped[list[int]] = mapped_column(
        JSONB, default=list, server_default=text("'[]'::jsonb")
    )
    # Outcomes joined to this variant's predictions in this bucket (by prediction time).
    outcomes: Mapped[int] = mapped_column(BigInteger, default=0)
    correct: Mapped[int] = mapped_column(BigInteger, default=0)
    log_loss_sum: Mapped[float] = mapped_column(Float, default=0.0)
    squared_error_sum: Mapped[float] = mapped_column(Float, default=0.0)
    absolute_error_sum: Mapped[float] = mapped_column(Float, default=0.0)


class VariantMetricsHourly(Base):
    """`variant_metrics` summed per hour (the monitor adds each flush's deltas to both), so a
    week is ~170 rows per variant instead of ~10,000: long windows read whole hours here and the
    minutes of their ragged edges from `variant_metrics` (carrara.monitoring.rollup)."""

    __tablename__ = "variant_metrics_hourly"
    __table_args__ = (
        Index("ix_variant_metrics_hourly_deployment_bucket", "deployment", "bucket_start"),
    )

    deployment: Mapped[str] = mapped_column(String(100), primary_key=True)
    variant: Mapped[str] = mapped_column(String(100), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    # The hour's newest minute row and its model version (what the minute rows' read reports).
    newest_minute: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model_version: Mapped[int | None] = mapped_column(Integer)
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    predictions: Mapped[int] = mapped_column(BigInteger, default=0)
    dead_letters: Mapped[int] = mapped_column(BigInteger, default=0)
    score_sum: Mapped[float] = mapped_column(Float, default=0.0)
    # Counts per bin, as in variant_metrics but always every bin (a minute's [] adds zeros).
    score_histogram: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    latency_histogram: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    end_to_end_histogram: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    outcomes: Mapped[int] = mapped_column(BigInteger, default=0)
    correct: Mapped[int] = mapped_column(BigInteger, default=0)
    log_loss_sum: Mapped[float] = mapped_column(Float, default=0.0)
    squared_error_sum: Mapped[float] = mapped_column(Float, default=0.0)
    absolute_error_sum: Mapped[float] = mapped_column(Float, default=0.0)


class PendingPrediction(Base):
    """A served or shadow prediction waiting for its outcome (the join's durable state)."""

    __tablename__ = "pending_predictions"
    __table_args__ = (
        Index("ix_pending_predictions_key", "deployment", "entity_key", "predicted_at"),
        Index("ix_pending_predictions_predicted_at", "predicted_at"),
    )

    deployment: Mapped[str] = mapped_column(String(100), primary_key=True)
    source_topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    source_partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    variant: Mapped[str] = mapped_column(String(100), primary_key=True)
    entity_key: Mapped[str | None] = mapped_column(String(500))
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    model_version: Mapped[int] = mapped_column(Integer)
    score: Mapped[Any] = mapped_column(JSONB)  # float, or list of class probabilities
    label: Mapped[Any] = mapped_column(JSONB)
    predicted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JoinedOutcome(Base):
    """A prediction with its observed outcome: what live AUC and the A/B verdict use."""

    __tablename__ = "joined_outcomes"
    __table_args__ = (Index("ix_joined_outcomes_lookup", "deployment", "variant", "predicted_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    deployment: Mapped[str] = mapped_column(String(100))
    variant: Mapped[str] = mapped_column(String(100))
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    model_version: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)  # P(positive) (binary) or the prediction
    outcome: Mapped[float] = mapped_column(Float)  # 0/1 (binary) or the observed value
    correct: Mapped[bool | None] = mapped_column(Boolean)
    predicted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutcomeStats(Base):
    """Per deployment and minute (of arrival): outcomes matched, late, or matching nothing."""

    __tablename__ = "outcome_stats"

    deployment: Mapped[str] = mapped_column(String(100), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    matched: Mapped[int] = mapped_column(BigInteger, default=0)
    late: Mapped[int] = mapped_column(BigInteger, default=0)
    unmatched: Mapped[int] = mapped_column(BigInteger, default=0)
    invalid: Mapped[int] = mapped_column(BigInteger, default=0)
    expired_predictions: Mapped[int] = mapped_column(BigInteger, default=0)


class FeatureDrift(Base):
    """Per deployment, feature and minute: live values counted in the training profile's bins."""

    __tablename__ = "feature_drift"
    __table_args__ = (Index("ix_feature_drift_deployment_bucket", "deployment", "bucket_start"),)

    deployment: Mapped[str] = mapped_column(String(100), primary_key=True)
    feature: Mapped[str] = mapped_column(String(200), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(Integer)
    counts: Mapped[list[int]] = mapped_column(JSONB, default=list)
    missing: Mapped[int] = mapped_column(BigInteger, default=0)


class Alert(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    deployment: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(50))  # drift | auto_rollback | auto_promote | ...
    severity: Mapped[str] = mapped_column(String(20))  # info | warning | critical
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # Repeated alerts about the same condition share a fingerprint and are not raised twice.
    fingerprint: Mapped[str] = mapped_column(String(200), index=True)


class MonitorOffset(Base):
    """Next offset to read per topic partition, written in the transaction of what it counted."""

    __tablename__ = "monitor_offsets"

    topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
