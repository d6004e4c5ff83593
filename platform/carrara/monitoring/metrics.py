"""Live metrics of a deployment: per-variant series of the monitor's minute rows re-bucketed,
window totals, live AUC and outcome counts.

Two latencies: `latency` is the scorer's in-process time (from the batch's start to the variant's
scores); `end_to_end` is from the input record's Kafka timestamp to the prediction record's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.errors import Invalid
from carrara.models import JoinedOutcome, OutcomeStats, VariantMetrics
from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS, SCORE_BINS
from carrara.monitoring import statistics
from carrara.monitoring.queries import (
    BUCKETS,
    DEFAULT_WINDOW,
    check_bucket_count,
    last_spec,
    utc,
    window,
)
from carrara.monitoring.rollup import bucket_sums
from carrara.monitoring.rules import finite

DEAD_LETTER_VARIANT = "-"


def is_regression(task: str | None) -> bool:
    """Whether outcomes are values (regression) rather than labels.

    The monitor joins the outcomes of a model of unknown task as labels (classification).
    """
    return task == "regression"


def _ratio(numerator: float, denominator: float) -> float | None:
    return finite(numerator / denominator) if denominator else None


@dataclass
class Sums:
    """Summed variant_metrics columns of one bucket (or of the whole window)."""

    predictions: int = 0
    dead_letters: int = 0
    score_sum: float = 0.0
    score_histogram: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    latency_histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    end_to_end_histogram: list[int] = field(
        default_factory=lambda: [0] * (len(END_TO_END_EDGES_MS) + 1)
    )
    outcomes: int = 0
    correct: int = 0
    log_loss_sum: float = 0.0
    squared_error_sum: float = 0.0
    absolute_error_sum: float = 0.0

    def add(self, other: Sums) -> None:
        for name in (
            "predictions",
            "dead_letters",
            "score_sum",
            "outcomes",
            "correct",
            "log_loss_sum",
            "squared_error_sum",
            "absolute_error_sum",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.score_histogram = _add(self.score_histogram, other.score_histogram)
        self.latency_histogram = _add(self.latency_histogram, other.latency_histogram)
        self.end_to_end_histogram = _add(self.end_to_end_histogram, other.end_to_end_histogram)


def _add(a: list[int], b: list[int]) -> list[int]:
    size = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(size)]


@dataclass
class MetricsPoint:
    """Derived metrics of a span: what the API shows for a bucket or a window."""

    predictions: int
    dead_letters: int
    mean_score: float | None
    score_histogram: list[int]
    latency_histogram: list[int]
    p50_latency_ms: float | None
    p99_latency_ms: float | None
    end_to_end_histogram: list[int]
    p50_end_to_end_ms: float | None
    p99_end_to_end_ms: float | None
    outcomes: int
    accuracy: float | None
    log_loss: float | None
    rmse: float | None
    mae: float | None
    bucket_start: datetime | None = None
    auc: float | None = None


def _quantile(counts: list[int], edges: Sequence[float], q: float) -> float | None:
    """The q-quantile of a histogram over `edges`; None when empty or of another bin count."""
    if len(counts) not in (len(edges), len(edges) + 1):
        return None
    return statistics.quantile_from_histogram(counts, edges, q)


def derive(sums: Sums, task: str | None, bucket_start: datetime | None = None) -> MetricsPoint:
    """Means, rates and latency quantiles of summed counts (per the task: classification or not)."""
    regression = is_regression(task)
    latency = sums.latency_histogram
    end_to_end = sums.end_to_end_histogram
    mse = _ratio(sums.squared_error_sum, sums.outcomes)
    return MetricsPoint(
        bucket_start=bucket_start,
        predictions=sums.predictions,
        dead_letters=sums.dead_letters,
        mean_score=_ratio(sums.score_sum, sums.predictions),
        score_histogram=sums.score_histogram,
        latency_histogram=latency,
        p50_latency_ms=_quantile(latency, LATENCY_EDGES_MS, 0.5),
        p99_latency_ms=_quantile(latency, LATENCY_EDGES_MS, 0.99),
        end_to_end_histogram=end_to_end,
        p50_end_to_end_ms=_quantile(end_to_end, END_TO_END_EDGES_MS, 0.5),
        p99_end_to_end_ms=_quantile(end_to_end, END_TO_END_EDGES_MS, 0.99),
        outcomes=sums.outcomes,
        accuracy=None if regression else _ratio(sums.correct, sums.outcomes),
        log_loss=None if regression else _ratio(sums.log_loss_sum, sums.outcomes),
        rmse=math.sqrt(mse) if regression and mse is not None else None,
        mae=_ratio(sums.absolute_error_sum, sums.outcomes) if regression else None,
    )


@dataclass
class VariantReport:
    variant: str
    shadow: bool
    model_version: int | None
    series: list[MetricsPoint]
    totals: MetricsPoint


@dataclass
class OutcomeCounts:
    matched: int = 0
    late: int = 0
    unmatched: int = 0
    invalid: int = 0
    expired_predictions: int = 0


@dataclass
class MetricsReport:
    deployment: str
    start: datetime
    end: datetime
    bucket: str
    task: str | None
    latency_edges_ms: list[float]
    end_to_end_edges_ms: list[float]
    variants: list[VariantReport]
    outcome_stats: OutcomeCounts


def metrics(
    session: Session,
    name: str,
    start: datetime | None = None,
    end: datetime | None = None,
    bucket: str = "minute",
    *,
    default: timedelta = DEFAULT_WINDOW,
    use_rollup: bool = True,
) -> MetricsReport:
    """Per-variant series of `bucket`-sized buckets in [start, end), with totals and live AUC.

    The window defaults as `queries.window` says (the last `default`, an hour). Minute rows are
    re-bucketed by summing in SQL (`date_trunc` in UTC); buckets without rows are left out.
    Outcome stats are those of outcomes that arrived in the window. `use_rollup=False` sums
    minute rows only (what the hourly rollup must equal; tests compare the two).
    """
    start, end = window(start, end, default)
    if bucket not in BUCKETS:
        raise Invalid(f"bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")
    check_bucket_count(start, end, bucket)
    deployment, _ = deployments.get_deployment(session, name)
    spec = last_spec(session, deployment)
    task = deployments.champion_task(session, spec)

    # One pass per (variant, bucket) in SQL: the scalar columns and every histogram bin summed,
    # bins read by index (`->> k`: one aggregate per bin, not one row per bin and row). Hour and
    # day buckets read whole hours from the hourly rollup and only the edges' minute rows.
    rows = bucket_sums(session, name, start, end, bucket, use_rollup=use_rollup)

    series: dict[str, list[MetricsPoint]] = defaultdict(list)
    totals: dict[str, Sums] = defaultdict(Sums)
    shadow: dict[str, bool] = {}
    versions: dict[str, int | None] = {}
    for values in rows:
        (
            variant,
            bucket_start,
            is_shadow,
            version,
            predictions,
            dead_letters,
            score_sum,
            outcomes,
            correct,
            log_loss_sum,
            squared_error_sum,
            absolute_error_sum,
        ) = values[:12]
        counts = [int(v or 0) for v in values[12:]]
        n_scores, n_latency = SCORE_BINS, len(LATENCY_EDGES_MS) + 1
        sums = Sums(
            predictions=int(predictions or 0),
            dead_letters=int(dead_letters or 0),
            score_sum=float(score_sum or 0.0),
            score_histogram=counts[:n_scores],
            latency_histogram=counts[n_scores : n_scores + n_latency],
            end_to_end_histogram=counts[n_scores + n_latency :],
            outcomes=int(outcomes or 0),
            correct=int(correct or 0),
            log_loss_sum=float(log_loss_sum or 0.0),
            squared_error_sum=float(squared_error_sum or 0.0),
            absolute_error_sum=float(absolute_error_sum or 0.0),
        )
        series[variant].append(derive(sums, task, utc(bucket_start)))
        totals[variant].add(sums)
        shadow[variant] = shadow.get(variant, False) or bool(is_shadow)
        if version is not None:
            versions[variant] = int(version)

    spec_variants = {v["name"]: v for v in spec["variants"]}
    names = sorted(spec_variants) + sorted(
        (set(series) - set(spec_variants)) - {DEAD_LETTER_VARIANT}
    )
    if DEAD_LETTER_VARIANT in series:
        names.append(DEAD_LETTER_VARIANT)
    aucs = _window_aucs(session, name, start, end) if not is_regression(task) else {}
    reports = []
    for variant in names:
        in_spec = spec_variants.get(variant)
        point = derive(totals[variant], task)
        point.auc = aucs.get(variant)
        reports.append(
            VariantReport(
                variant=variant,
                shadow=shadow.get(variant, bool(in_spec and in_spec["shadow"])),
                model_version=versions.get(variant, in_spec["version"] if in_spec else None),
                series=series.get(variant, []),
                totals=point,
            )
        )
    return MetricsReport(
        deployment=name,
        start=start,
        end=end,
        bucket=bucket,
        task=task,
        latency_edges_ms=[float(e) for e in LATENCY_EDGES_MS],
        end_to_end_edges_ms=[float(e) for e in END_TO_END_EDGES_MS],
        variants=reports,
        outcome_stats=_outcome_counts(session, name, start, end),
    )


def live_predictions(
    session: Session, names: Sequence[str], start: datetime, end: datetime
) -> dict[str, int]:
    """Events scored by live (non-shadow, routed) variants in [start, end), per deployment, in
    one query (an overview of many deployments needs only this, not each one's metrics)."""
    if not names:
        return {}
    rows = session.execute(
        select(VariantMetrics.deployment, func.sum(VariantMetrics.predictions))
        .where(
            VariantMetrics.deployment.in_(names),
            VariantMetrics.bucket_start >= start,
            VariantMetrics.bucket_start < end,
            VariantMetrics.shadow.is_(False),
            VariantMetrics.variant != DEAD_LETTER_VARIANT,
        )
        .group_by(VariantMetrics.deployment)
    ).all()
    return {str(name): int(total or 0) for name, total in rows}


def _window_aucs(
    session: Session, name: str, start: datetime, end: datetime
) -> dict[str, float | None]:
    """Live ROC AUC per variant of the outcomes joined to predictions made in the window."""
    # Per variant, scores and outcomes as two arrays of one aggregate pass (same rows, same
    # order): a window's thousands of outcomes arrive as lists, not as thousands of rows.
    rows = session.execute(
        select(
            JoinedOutcome.variant,
            func.array_agg(JoinedOutcome.score),
            func.array_agg(JoinedOutcome.outcome),
        )
        .where(
            JoinedOutcome.deployment == name,
            JoinedOutcome.predicted_at >= start,
            JoinedOutcome.predicted_at < end,
        )
        .group_by(JoinedOutcome.variant)
    ).all()
    aucs: dict[str, float | None] = {}
    for variant, scores, outcomes in rows:
        y = np.asarray(outcomes, dtype=np.float64)
        p = np.asarray(scores, dtype=np.float64)
        # AUC needs 0/1 outcomes and finite scores (a multiclass join stores class indices).
        if not (np.isin(y, (0.0, 1.0)).all() and np.isfinite(p).all()):
            aucs[variant] = None
            continue
        aucs[variant] = finite(statistics.auc(p, y))
    return aucs


def _outcome_counts(session: Session, name: str, start: datetime, end: datetime) -> OutcomeCounts:
    row = session.execute(
        select(
            func.coalesce(func.sum(OutcomeStats.matched), 0),
            func.coalesce(func.sum(OutcomeStats.late), 0),
            func.coalesce(func.sum(OutcomeStats.unmatched), 0),
            func.coalesce(func.sum(OutcomeStats.invalid), 0),
            func.coalesce(func.sum(OutcomeStats.expired_predictions), 0),
        ).where(
            OutcomeStats.deployment == name,
            OutcomeStats.bucket_start >= start,
            OutcomeStats.bucket_start < end,
        )
    ).one()
    return OutcomeCounts(*(int(v) for v in row))
