"""Chart data for a deployment's live panel, from the monitoring API's metrics response.

Pure: the series are what `GET /api/v1/deployments/{name}/metrics` returns, aligned on one time
axis so every chart of the panel shares it (web/static/app.js draws them with Chart.js).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from carrara.monitoring.schemas import MetricsOut, MetricsPoint

# The pseudo-variant of dead letters that no variant scored (undecodable, invalid events).
UNROUTED = "-"
UNROUTED_LABEL = "not routed"
SCORE_BINS = 20
# The windows the panel offers: (label, seconds, bucket).
WINDOWS = {
    "15m": ("15 minutes", 15 * 60, "minute"),
    "1h": ("1 hour", 3600, "minute"),
    "6h": ("6 hours", 6 * 3600, "minute"),
    "24h": ("24 hours", 86_400, "hour"),
}
DEFAULT_WINDOW = "15m"
BUCKET_SIZES = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def time_axis(start: datetime, end: datetime, bucket: str) -> list[datetime]:
    """Every bucket start from the one holding `start` to the last before `end` (UTC)."""
    size = BUCKET_SIZES[bucket]
    first = _EPOCH + size * ((start.astimezone(UTC) - _EPOCH) // size)
    count = max(0, -(-(end.astimezone(UTC) - first) // size))  # ceiling division
    return [first + size * i for i in range(count)]


def _live_metric(task: str | None) -> tuple[str, str]:
    """(field, label) of the live quality metric the panel charts for `task`."""
    if task == "regression":
        return "rmse", "Live RMSE"
    return "accuracy", "Live accuracy"


def chart_data(metrics: MetricsOut, champion: str | None = None) -> dict[str, Any]:
    """Labels (bucket starts) and per-variant series of every chart of the live panel.

    The axis spans the whole window, so the charts read as a timeline: a bucket without events
    has a throughput of 0 and no latency, score or accuracy (a gap in the line). The last bucket
    is still filling (`partial`): it has no 0 when empty, and the charts draw it dashed, so it
    never reads as a drop in traffic. `champion` keeps the first colour whatever is added.
    """
    axis = time_axis(metrics.start, metrics.end, metrics.bucket)
    size = BUCKET_SIZES[metrics.bucket]
    partial = bool(axis) and axis[-1] + size > metrics.end.astimezone(UTC)
    labels = [moment.isoformat() for moment in axis]
    metric_field, metric_label = _live_metric(metrics.task)
    # Events per bucket over all variants: the denominator of the not-routed dead-letter rate.
    events: dict[datetime, int] = dict.fromkeys(axis, 0)
    for variant in metrics.variants:
        for point in variant.series:
            if not variant.shadow:
                events[point.bucket_start] += point.predictions + point.dead_letters

    series = []
    for variant in metrics.variants:
        by_start: dict[datetime, MetricsPoint] = {p.bucket_start: p for p in variant.series}
        routed = variant.variant != UNROUTED
        throughput, p50, p99, e2e_p50, e2e_p99, dead, quality = [], [], [], [], [], [], []
        for moment in axis:
            point = by_start.get(moment)
            if point is None:
                unfinished = partial and moment == axis[-1]
                throughput.append(0 if routed and not unfinished else None)
                for values in (p50, p99, e2e_p50, e2e_p99, dead, quality):
                    values.append(None)
                continue
            # One bucket's events: per minute or per hour, as the bucket is.
            throughput.append(point.predictions if routed else None)
            p50.append(point.p50_latency_ms)
            p99.append(point.p99_latency_ms)
            e2e_p50.append(point.p50_end_to_end_ms)
            e2e_p99.append(point.p99_end_to_end_ms)
            whole = point.predictions + point.dead_letters if routed else events[moment]
            dead.append(_rate(point.dead_letters, whole))
            quality.append(getattr(point, metric_field))
        histogram = list(variant.totals.score_histogram)[:SCORE_BINS]
        total = sum(histogram)
        series.append(
            {
                "name": UNROUTED_LABEL if not routed else variant.variant,
                "shadow": variant.shadow,
                "routed": routed,
                "throughput": throughput,
                # In-process scoring time, and end to end (input record -> prediction written).
                "p50": p50,
                "p99": p99,
                "end_to_end_p50": e2e_p50,
                "end_to_end_p99": e2e_p99,
                "dead_letter_rate": dead,
                "quality": quality,
                "scores": [count / total for count in histogram] if total else [],
            }
        )
    return {
        "labels": labels,
        "bucket": metrics.bucket,
        "throughput_unit": f"events per {metrics.bucket}",
        "quality_label": metric_label,
        "quality_is_rate": metric_field == "accuracy",
        "score_bins": [f"{i / SCORE_BINS:.2f}" for i in range(SCORE_BINS)],
        "series": series,
        "partial": partial,
        "champion": champion,
    }


def total_predictions(metrics: MetricsOut) -> int:
    """Events scored by live (non-shadow) variants in the window."""
    return sum(
        v.totals.predictions for v in metrics.variants if not v.shadow and v.variant != UNROUTED
    )
