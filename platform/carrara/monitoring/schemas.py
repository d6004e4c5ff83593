"""Pydantic I/O models of the monitoring API: metric series, A/B verdicts, drift, alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Bucket = Literal["minute", "hour", "day"]


class _FromAttributes(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class MetricsTotals(_FromAttributes):
    """What a variant did over a time span (a bucket, or the whole window)."""

    predictions: int = Field(description="Events scored")
    dead_letters: int = Field(description="Events that went to the dead-letter topic")
    mean_score: float | None = Field(description="Mean score (P(positive) or the prediction)")
    score_histogram: list[int] = Field(description="Counts in 20 equal bins over [0, 1]")
    latency_histogram: list[int] = Field(
        description="In-process scoring time: counts per bin (upper edges `latency_edges_ms`, "
        "then overflow)"
    )
    p50_latency_ms: float | None = Field(
        description="Median in-process scoring time (the scorer's batch, from its start to this "
        "variant's scores), ms; null: no predictions"
    )
    p99_latency_ms: float | None = Field(
        description="99th percentile of the in-process scoring time, ms"
    )
    end_to_end_histogram: list[int] = Field(
        default_factory=list,
        description="End-to-end latency (input record's Kafka timestamp to the prediction "
        "record's): counts per bin (upper edges `end_to_end_edges_ms`, then overflow)",
    )
    p50_end_to_end_ms: float | None = Field(
        default=None,
        description="Median end-to-end latency: from the input record's Kafka timestamp to the "
        "prediction being written, queueing and consumer lag included, ms; null: not measured "
        "(no predictions, or written by a scorer that does not record `input_ms`)",
    )
    p99_end_to_end_ms: float | None = Field(
        default=None, description="99th percentile of the end-to-end latency, ms"
    )
    outcomes: int = Field(description="Outcomes joined to predictions made in this span")
    accuracy: float | None = Field(description="Classification: share of correct predictions")
    log_loss: float | None = Field(description="Classification: mean log loss")
    rmse: float | None = Field(description="Regression: root mean squared error")
    mae: float | None = Field(description="Regression: mean absolute error")


class MetricsPoint(MetricsTotals):
    bucket_start: datetime


class VariantTotals(MetricsTotals):
    auc: float | None = Field(
        description="Binary classification: ROC AUC of the outcomes joined in the window"
    )


class VariantMetricsOut(_FromAttributes):
    variant: str = Field(description="Variant name; `-` holds dead letters no variant scored")
    shadow: bool
    model_version: int | None = Field(description="Model version of the newest bucket")
    series: list[MetricsPoint] = Field(description="Buckets with data, oldest first")
    totals: VariantTotals


class OutcomeStatsOut(_FromAttributes):
    """Outcomes that arrived in the window, by what became of them."""

    matched: int
    late: int = Field(description="Arrived after the join window of their prediction")
    unmatched: int = Field(description="Matched no prediction")
    invalid: int = Field(description="Could not be read (no key, no outcome value)")
    expired_predictions: int = Field(description="Predictions whose window ended unmatched")


class MetricsOut(_FromAttributes):
    deployment: str
    start: datetime = Field(serialization_alias="from", description="Window start (inclusive)")
    end: datetime = Field(serialization_alias="to", description="Window end (exclusive)")
    bucket: Bucket
    task: str | None = Field(description="Task of the champion's model, when known")
    latency_edges_ms: list[float] = Field(
        description="Upper bin edges of `latency_histogram` (in-process scoring time), ms"
    )
    end_to_end_edges_ms: list[float] = Field(
        default_factory=list,
        description="Upper bin edges of `end_to_end_histogram` (end-to-end latency), ms",
    )
    variants: list[VariantMetricsOut]
    outcome_stats: OutcomeStatsOut


class ComparisonOut(_FromAttributes):
    """One challenger against the champion, by the always-valid sequential test."""

    challenger: str
    n_champion: int
    n_challenger: int
    mean_champion: float | None = Field(description="Mean per-row metric (rmse: mean sq. error)")
    mean_challenger: float | None
    difference: float | None = Field(description="mean_challenger - mean_champion")
    ci_low: float | None = Field(description="Confidence sequence of the difference, at 1-alpha")
    ci_high: float | None
    p_value: float | None = Field(description="Always-valid p-value (safe to peek at)")
    confidence: float | None = Field(description="1 - p_value")
    better: Literal["challenger", "champion"] | None
    significant: bool
    verdict: str = Field(examples=["challenger better, 97% confidence, n = 41,200"])


class VerdictOut(_FromAttributes):
    deployment: str
    since: datetime = Field(
        description="Outcomes of predictions made since then (the current revision) count"
    )
    metric: str
    higher_is_better: bool
    alpha: float
    champion: str
    min_outcomes: int = Field(description="Outcomes each arm needs before it is tested")
    comparisons: list[ComparisonOut]


class FeatureDriftOut(_FromAttributes):
    feature: str
    kind: str = Field(description="numeric or category")
    psi: float | None = Field(description="Population stability index vs. training; null: no data")
    ks: float | None = Field(description="Kolmogorov-Smirnov distance (numeric features)")
    live_count: int = Field(description="Live values counted in the window")
    missing: int = Field(description="Live events without a value for the feature")
    drifted: bool = Field(description="psi > threshold")


class DriftOut(_FromAttributes):
    deployment: str
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    threshold: float
    model: str = Field(description="The champion's model, whose training profile is compared")
    model_version: int
    features: list[FeatureDriftOut]
    note: str | None = Field(default=None, description="Why there is nothing to compare")


class AlertOut(_FromAttributes):
    id: int
    at: datetime
    deployment: str
    kind: str
    severity: str
    message: str
    details: dict[str, Any]
    fingerprint: str
