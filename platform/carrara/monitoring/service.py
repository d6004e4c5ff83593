"""The read side of monitoring: per-variant metric series, A/B verdicts, drift, alerts.

The monitor process fills the tables (carrara.monitoring.monitor); everything here only reads
them and derives what the API shows, with the formulas of carrara.monitoring.statistics.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, ColumnElement, Select, cast, func, literal_column, select, true
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.deployments.schemas import MonitoringConfig
from carrara.errors import Invalid
from carrara.models import (
    Alert,
    Deployment,
    DeploymentRevision,
    FeatureDrift,
    JoinedOutcome,
    ModelVersion,
    OutcomeStats,
    RegisteredModel,
    VariantMetrics,
)
from carrara.models.monitoring import LATENCY_EDGES_MS, SCORE_BINS
from carrara.monitoring import statistics
from carrara.pagination import PageParams, paginate

BUCKETS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_BUCKETS = 10_000
DEFAULT_WINDOW = timedelta(hours=1)
DEAD_LETTER_VARIANT = "-"
# Below this many outcomes per arm the plug-in variance of the sequential test is too noisy to
# report an interval worth reading, so the verdict says so instead.
MIN_VERDICT_OUTCOMES = 30
NOT_ENOUGH = "not enough outcomes yet"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(moment: datetime) -> datetime:
    # A time without an offset is read as UTC, as the tables store UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def window(
    start: datetime | None, end: datetime | None, default: timedelta = DEFAULT_WINDOW
) -> tuple[datetime, datetime]:
    """The [start, end) window asked for: default the last `default` up to now; Invalid if empty."""
    try:
        end = _utc(end) if end is not None else datetime.now(UTC)
        start = _utc(start) if start is not None else end - default
    except (OverflowError, ValueError) as exc:
        raise Invalid(f"the time window cannot be represented: {exc}") from exc
    if start >= end:
        raise Invalid(f"`from` ({start.isoformat()}) must be before `to` ({end.isoformat()})")
    return start, end


def _check_bucket_count(start: datetime, end: datetime, bucket: str) -> None:
    size = BUCKETS[bucket].total_seconds()
    first = math.floor((start - _EPOCH).total_seconds() / size)
    last = math.ceil((end - _EPOCH).total_seconds() / size) - 1
    count = last - first + 1
    if count > MAX_BUCKETS:
        raise Invalid(
            f"the window spans {count:,} {bucket} buckets, more than {MAX_BUCKETS:,}: "
            "narrow it or use a larger bucket"
        )


def _finite(value: float | None) -> float | None:
    # JSON has no NaN or infinity; an undefined number is null.
    return value if value is not None and math.isfinite(value) else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return _finite(numerator / denominator) if denominator else None


def last_running_revision(session: Session, deployment: Deployment) -> DeploymentRevision:
    """The current revision, or for a stopped deployment the last one that had a spec."""
    revision = session.scalar(
        select(DeploymentRevision)
        .where(
            DeploymentRevision.deployment_id == deployment.id,
            # A stop's spec is a JSON null, not SQL NULL.
            func.jsonb_typeof(DeploymentRevision.spec) == "object",
        )
        .order_by(DeploymentRevision.number.desc())
        .limit(1)
    )
    if revision is None:  # cannot happen: a deployment's first revision always has a spec
        raise Invalid(f"deployment '{deployment.name}' never had a spec")
    return revision


def last_spec(session: Session, deployment: Deployment) -> dict[str, Any]:
    """The spec of `last_running_revision`."""
    spec = last_running_revision(session, deployment).spec
    assert spec is not None  # selected for being an object
    return dict(spec)


def _config(spec: dict[str, Any]) -> MonitoringConfig:
    config, _ = deployments.monitoring_config_of(spec)
    return config or MonitoringConfig()


def _is_regression(task: str | None) -> bool:
    # The monitor joins the outcomes of a model of unknown task as labels (classification).
    return task == "regression"


# --- metrics --------------------------------------------------------------------------------


@dataclass
class Sums:
    """Summed variant_metrics columns of one bucket (or of the whole window)."""

    predictions: int = 0
    dead_letters: int = 0
    score_sum: float = 0.0
    score_histogram: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    latency_histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
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
    outcomes: int
    accuracy: float | None
    log_loss: float | None
    rmse: float | None
    mae: float | None
    bucket_start: datetime | None = None
    auc: float | None = None


def derive(sums: Sums, task: str | None, bucket_start: datetime | None = None) -> MetricsPoint:
    """Means, rates and latency quantiles of summed counts (per the task: classification or not)."""
    regression = _is_regression(task)
    latency = sums.latency_histogram
    has_latency = len(latency) in (len(LATENCY_EDGES_MS), len(LATENCY_EDGES_MS) + 1)
    mse = _ratio(sums.squared_error_sum, sums.outcomes)
    return MetricsPoint(
        bucket_start=bucket_start,
        predictions=sums.predictions,
        dead_letters=sums.dead_letters,
        mean_score=_ratio(sums.score_sum, sums.predictions),
        score_histogram=sums.score_histogram,
        latency_histogram=latency,
        p50_latency_ms=statistics.quantile_from_histogram(latency, LATENCY_EDGES_MS, 0.5)
        if has_latency
        else None,
        p99_latency_ms=statistics.quantile_from_histogram(latency, LATENCY_EDGES_MS, 0.99)
        if has_latency
        else None,
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
    variants: list[VariantReport]
    outcome_stats: OutcomeCounts


def _summed_arrays(
    session: Session, rows: Select[Any], array: ColumnElement[Any], keys: list[ColumnElement[Any]]
) -> dict[tuple[Any, ...], list[int]]:
    """Element-wise sums of the JSONB int array `array` over `rows`, grouped by `keys` (in SQL)."""
    source = rows.subquery()
    column = source.c[array.key]
    grouped = [source.c[k.key] for k in keys]
    element = (
        func.jsonb_array_elements_text(column)
        .table_valued("value", with_ordinality="ord")
        .render_derived(name="element")
    )
    stmt = (
        select(*grouped, element.c.ord, func.sum(cast(element.c.value, BigInteger)))
        .select_from(source.join(element, true()))
        .group_by(*grouped, element.c.ord)
    )
    sums: dict[tuple[Any, ...], list[int]] = {}
    for *group, ordinal, total in session.execute(stmt):
        values = sums.setdefault(tuple(group), [])
        values.extend([0] * (ordinal - len(values)))
        values[ordinal - 1] = int(total)
    return sums


def metrics(
    session: Session, name: str, start: datetime, end: datetime, bucket: str
) -> MetricsReport:
    """Per-variant series of `bucket`-sized buckets in [start, end), with totals and live AUC.

    Minute rows are re-bucketed by summing in SQL (`date_trunc` in UTC); buckets without rows
    are left out. Outcome stats are those of outcomes that arrived in the window.
    """
    if bucket not in BUCKETS:
        raise Invalid(f"bucket must be one of {', '.join(BUCKETS)}, got {bucket!r}")
    _check_bucket_count(start, end, bucket)
    deployment, _ = deployments.get_deployment(session, name)
    spec = last_spec(session, deployment)
    task = deployments.champion_task(session, spec)

    # The unit is one of BUCKETS (checked above): a literal, so select and GROUP BY agree.
    truncated = func.date_trunc(
        literal_column(f"'{bucket}'"), VariantMetrics.bucket_start, literal_column("'UTC'")
    ).label("b")
    in_window = select(
        VariantMetrics.variant,
        truncated,
        VariantMetrics.bucket_start,
        VariantMetrics.shadow,
        VariantMetrics.model_version,
        VariantMetrics.predictions,
        VariantMetrics.dead_letters,
        VariantMetrics.score_sum,
        VariantMetrics.score_histogram,
        VariantMetrics.latency_histogram,
        VariantMetrics.outcomes,
        VariantMetrics.correct,
        VariantMetrics.log_loss_sum,
        VariantMetrics.squared_error_sum,
        VariantMetrics.absolute_error_sum,
    ).where(
        VariantMetrics.deployment == name,
        VariantMetrics.bucket_start >= start,
        VariantMetrics.bucket_start < end,
    )
    rows = in_window.subquery()
    c = rows.c
    # The model version of the newest minute in the bucket.
    newest_version = func.array_agg(aggregate_order_by(c.model_version, c.bucket_start.desc()))[1]
    scalar_sums = session.execute(
        select(
            c.variant,
            c.b,
            func.bool_or(c.shadow),
            newest_version,
            func.sum(c.predictions),
            func.sum(c.dead_letters),
            func.sum(c.score_sum),
            func.sum(c.outcomes),
            func.sum(c.correct),
            func.sum(c.log_loss_sum),
            func.sum(c.squared_error_sum),
            func.sum(c.absolute_error_sum),
        )
        .group_by(c.variant, c.b)
        .order_by(c.variant, c.b)
    ).all()
    keys: list[ColumnElement[Any]] = [VariantMetrics.variant, truncated]
    score_histograms = _summed_arrays(session, in_window, VariantMetrics.score_histogram, keys)
    latency_histograms = _summed_arrays(session, in_window, VariantMetrics.latency_histogram, keys)

    series: dict[str, list[MetricsPoint]] = defaultdict(list)
    totals: dict[str, Sums] = defaultdict(Sums)
    shadow: dict[str, bool] = {}
    versions: dict[str, int | None] = {}
    for (
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
    ) in scalar_sums:
        sums = Sums(
            predictions=int(predictions or 0),
            dead_letters=int(dead_letters or 0),
            score_sum=float(score_sum or 0.0),
            score_histogram=_padded(score_histograms.get((variant, bucket_start)), SCORE_BINS),
            latency_histogram=_padded(
                latency_histograms.get((variant, bucket_start)), len(LATENCY_EDGES_MS) + 1
            ),
            outcomes=int(outcomes or 0),
            correct=int(correct or 0),
            log_loss_sum=float(log_loss_sum or 0.0),
            squared_error_sum=float(squared_error_sum or 0.0),
            absolute_error_sum=float(absolute_error_sum or 0.0),
        )
        series[variant].append(derive(sums, task, _utc(bucket_start)))
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
    aucs = _window_aucs(session, name, start, end) if not _is_regression(task) else {}
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
        variants=reports,
        outcome_stats=_outcome_counts(session, name, start, end),
    )


def _padded(values: list[int] | None, size: int) -> list[int]:
    values = list(values or [])
    return values + [0] * (size - len(values)) if len(values) < size else values


def _window_aucs(
    session: Session, name: str, start: datetime, end: datetime
) -> dict[str, float | None]:
    """Live ROC AUC per variant of the outcomes joined to predictions made in the window."""
    rows = session.execute(
        select(JoinedOutcome.variant, JoinedOutcome.score, JoinedOutcome.outcome)
        .where(
            JoinedOutcome.deployment == name,
            JoinedOutcome.predicted_at >= start,
            JoinedOutcome.predicted_at < end,
        )
        .order_by(JoinedOutcome.variant)
    ).all()
    grouped: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for variant, score, outcome in rows:
        grouped[variant][0].append(score)
        grouped[variant][1].append(outcome)
    aucs: dict[str, float | None] = {}
    for variant, (scores, outcomes) in grouped.items():
        y = np.asarray(outcomes, dtype=np.float64)
        p = np.asarray(scores, dtype=np.float64)
        # AUC needs 0/1 outcomes and finite scores (a multiclass join stores class indices).
        if not (np.isin(y, (0.0, 1.0)).all() and np.isfinite(p).all()):
            aucs[variant] = None
            continue
        aucs[variant] = _finite(statistics.auc(p, y))
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


# --- verdict --------------------------------------------------------------------------------


@dataclass
class Comparison:
    challenger: str
    n_champion: int
    n_challenger: int
    mean_champion: float | None
    mean_challenger: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    confidence: float | None
    better: str | None
    significant: bool
    verdict: str


@dataclass
class Verdict:
    deployment: str
    since: datetime
    metric: str
    higher_is_better: bool
    alpha: float
    champion: str
    min_outcomes: int
    comparisons: list[Comparison]


def per_row_values(
    metric: str,
    task: str | None,
    scores: np.ndarray,
    outcomes: np.ndarray,
    correct: np.ndarray,
) -> np.ndarray:
    """The per-row metric of joined outcomes, whose mean is the metric (rmse: squared error).

    A multiclass join stores P(observed class) as the score and the class index as the outcome,
    so there log loss is -log(score) and accuracy is the joined `correct` flag.
    """
    if task == "multiclass" and metric == "log_loss":
        return statistics.per_row_metric(metric, scores, np.ones_like(scores))
    if task == "multiclass" and metric == "accuracy":
        return correct
    return statistics.per_row_metric(metric, scores, outcomes)


def _joined(
    session: Session, name: str, variant: str, version: int, since: datetime
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = session.execute(
        select(JoinedOutcome.score, JoinedOutcome.outcome, JoinedOutcome.correct).where(
            JoinedOutcome.deployment == name,
            JoinedOutcome.variant == variant,
            JoinedOutcome.model_version == version,
            JoinedOutcome.predicted_at >= since,
        )
    ).all()
    scores = np.asarray([r[0] for r in rows], dtype=np.float64)
    outcomes = np.asarray([r[1] for r in rows], dtype=np.float64)
    correct = np.asarray([1.0 if r[2] else 0.0 for r in rows], dtype=np.float64)
    return scores, outcomes, correct


def verdict(session: Session, name: str) -> Verdict:
    """Every other variant (live or shadow) against the champion, by the sequential test.

    Counts the outcomes of predictions made since the current revision, by the model versions it
    serves: the evidence the automatic promotion/rollback policy acts on, and never traffic that
    another configuration produced. Arms with fewer than MIN_VERDICT_OUTCOMES outcomes are
    reported as "not enough outcomes yet".
    """
    deployment, _ = deployments.get_deployment(session, name)
    revision = last_running_revision(session, deployment)
    spec = dict(revision.spec or {})
    since = revision.created_at
    config = _config(spec)
    metric = deployments.verdict_metric(session, spec)
    task = deployments.champion_task(session, spec)
    champion = deployments.champion_of(spec)
    versions = {v["name"]: v["version"] for v in spec["variants"]}
    champion_values = per_row_values(
        metric, task, *_joined(session, name, champion, versions[champion], since)
    )
    comparisons = []
    for challenger in sorted(v for v in versions if v != champion):
        values = per_row_values(
            metric, task, *_joined(session, name, challenger, versions[challenger], since)
        )
        result = statistics.sequential_test(
            champion_values, values, metric=metric, alpha=config.alpha
        )
        enough = min(result.n_champion, result.n_challenger) >= MIN_VERDICT_OUTCOMES
        comparisons.append(
            Comparison(
                challenger=challenger,
                n_champion=result.n_champion,
                n_challenger=result.n_challenger,
                mean_champion=_finite(result.mean_champion),
                mean_challenger=_finite(result.mean_challenger),
                difference=_finite(result.difference),
                ci_low=_finite(result.ci_low) if enough else None,
                ci_high=_finite(result.ci_high) if enough else None,
                p_value=_finite(result.p_value) if enough else None,
                confidence=_finite(result.confidence) if enough else None,
                better=result.better if enough else None,
                significant=result.significant and enough,
                verdict=statistics.verdict_text(result, champion, challenger)
                if enough
                else (
                    f"{NOT_ENOUGH} (champion {champion}: {result.n_champion:,}, challenger "
                    f"{challenger}: {result.n_challenger:,}; {MIN_VERDICT_OUTCOMES} each needed)"
                ),
            )
        )
    return Verdict(
        deployment=name,
        since=since,
        metric=metric,
        higher_is_better=statistics.higher_is_better(metric),
        alpha=config.alpha,
        champion=champion,
        min_outcomes=MIN_VERDICT_OUTCOMES,
        comparisons=comparisons,
    )


# --- drift ----------------------------------------------------------------------------------


@dataclass
class FeatureDriftReport:
    feature: str
    kind: str
    psi: float | None
    ks: float | None
    live_count: int
    missing: int
    drifted: bool


@dataclass
class DriftReport:
    deployment: str
    start: datetime
    end: datetime
    threshold: float
    model: str
    model_version: int
    features: list[FeatureDriftReport]
    note: str | None = None


def drift(session: Session, name: str, start: datetime, end: datetime) -> DriftReport:
    """PSI (and KS for numeric features) of live inputs in [start, end) vs. the training profile.

    Live counts are the feature_drift rows the monitor wrote for the champion's model version,
    summed over the window; the expected shares are that version's `feature_profile`.
    """
    deployment, _ = deployments.get_deployment(session, name)
    spec = last_spec(session, deployment)
    threshold = _config(spec).drift_psi_threshold
    champion = deployments.variant_of(spec, deployments.champion_of(spec))
    version = session.scalar(
        select(ModelVersion)
        .join(RegisteredModel, ModelVersion.registered_model_id == RegisteredModel.id)
        .where(
            RegisteredModel.name == champion["model"],
            ModelVersion.version == champion["version"],
        )
    )
    report = DriftReport(
        deployment=name,
        start=start,
        end=end,
        threshold=threshold,
        model=champion["model"],
        model_version=champion["version"],
        features=[],
    )
    profile = version.feature_profile if version is not None else None
    features = profile.get("features") if isinstance(profile, dict) else None
    if not isinstance(features, dict) or not features:
        report.note = (
            f"model {champion['model']} v{champion['version']} (champion '{champion['name']}') "
            "has no training profile to compare with; versions trained by Carrara store one"
        )
        return report
    assert version is not None
    # Only counts binned by this version's profile (the champion may have changed in the window).
    conditions = (
        FeatureDrift.deployment == name,
        FeatureDrift.model_version_id == version.id,
        FeatureDrift.bucket_start >= start,
        FeatureDrift.bucket_start < end,
    )
    in_window = select(FeatureDrift.feature, FeatureDrift.counts).where(*conditions)
    counts = _summed_arrays(session, in_window, FeatureDrift.counts, [FeatureDrift.feature])
    missing: dict[str, Any] = dict(
        session.execute(
            select(FeatureDrift.feature, func.sum(FeatureDrift.missing))
            .where(*conditions)
            .group_by(FeatureDrift.feature)
        ).all()
    )
    for feature in sorted(features):
        report.features.append(
            _feature_drift(feature, features[feature], counts.get((feature,)), missing, threshold)
        )
    return report


def _feature_drift(
    feature: str,
    profile: Any,
    counts: list[int] | None,
    missing: dict[str, Any],
    threshold: float,
) -> FeatureDriftReport:
    kind = str(profile.get("kind", "")) if isinstance(profile, dict) else ""
    shares = profile.get("shares") if isinstance(profile, dict) else None
    live = list(counts or [])
    if isinstance(shares, list) and not live:
        live = [0] * len(shares)
    live_count = sum(live)
    psi = ks = None
    # Counts binned by another profile (a changed bin count) cannot be compared with this one.
    if isinstance(shares, list) and len(shares) == len(live) and live_count > 0:
        psi = _finite(statistics.psi(shares, live))
        if kind == "numeric":
            ks = _finite(statistics.ks_statistic(shares, live))
    return FeatureDriftReport(
        feature=feature,
        kind=kind,
        psi=psi,
        ks=ks,
        live_count=live_count,
        missing=int(missing.get(feature) or 0),
        drifted=psi is not None and psi > threshold,
    )


# --- alerts ---------------------------------------------------------------------------------


def list_alerts(
    session: Session,
    params: PageParams,
    *,
    deployment: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
) -> tuple[list[Alert], str | None]:
    """Alerts newest first, filtered by deployment, kind and time."""
    stmt = select(Alert)
    if deployment:
        stmt = stmt.where(Alert.deployment == deployment)
    if kind:
        stmt = stmt.where(Alert.kind == kind)
    if since is not None:
        stmt = stmt.where(Alert.at >= _utc(since))
    return paginate(session, stmt, Alert.id, params)
