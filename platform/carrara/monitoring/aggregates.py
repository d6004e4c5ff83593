"""In-memory deltas of one monitor batch, flushed to Postgres in the batch's transaction.

Histograms have fixed bins (models.monitoring) so rows written by any monitor process add up.
Flushing locks each touched row (`SELECT ... FOR UPDATE`), adds the delta and writes it back, so
monitors sharing a deployment's partitions never lose each other's counts. Variant rows' deltas
are added to their hour too (carrara.monitoring.rollup), after every minute row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from carrara.models import FeatureDrift, OutcomeStats, VariantMetrics
from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS, SCORE_BINS
from carrara.monitoring.rollup import HourDeltas


def minute(ms: int | float) -> datetime:
    """The start of the minute containing the epoch-milliseconds `ms` (UTC)."""
    seconds = int(ms // 1000)
    return datetime.fromtimestamp(seconds - seconds % 60, tz=UTC)


def score_bin(score: float) -> int:
    return min(SCORE_BINS - 1, max(0, int(score * SCORE_BINS)))


def latency_bin(latency_ms: float) -> int:
    return bisect.bisect_left(LATENCY_EDGES_MS, latency_ms)


def end_to_end_bin(latency_ms: float) -> int:
    return bisect.bisect_left(END_TO_END_EDGES_MS, latency_ms)


def _add(a: list[int], b: list[int]) -> list[int]:
    if len(a) < len(b):
        a = a + [0] * (len(b) - len(a))
    return [x + (b[i] if i < len(b) else 0) for i, x in enumerate(a)]


@dataclass
class VariantDelta:
    shadow: bool = False
    model_version: int | None = None
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


@dataclass
class OutcomeDelta:
    matched: int = 0
    late: int = 0
    unmatched: int = 0
    invalid: int = 0
    expired_predictions: int = 0


@dataclass
class DriftDelta:
    model_version_id: int
    counts: list[int]
    missing: int = 0


@dataclass
class Deltas:
    variants: dict[tuple[str, str, datetime], VariantDelta] = field(default_factory=dict)
    outcomes: dict[tuple[str, datetime], OutcomeDelta] = field(default_factory=dict)
    drift: dict[tuple[str, str, datetime], DriftDelta] = field(default_factory=dict)

    def variant(self, deployment: str, variant: str, bucket: datetime) -> VariantDelta:
        key = (deployment, variant, bucket)
        if key not in self.variants:
            self.variants[key] = VariantDelta()
        return self.variants[key]

    def outcome(self, deployment: str, bucket: datetime) -> OutcomeDelta:
        key = (deployment, bucket)
        if key not in self.outcomes:
            self.outcomes[key] = OutcomeDelta()
        return self.outcomes[key]

    def drift_for(
        self, deployment: str, feature: str, bucket: datetime, model_version_id: int, bins: int
    ) -> DriftDelta:
        key = (deployment, feature, bucket)
        if key not in self.drift:
            self.drift[key] = DriftDelta(model_version_id, [0] * bins)
        return self.drift[key]

    def flush(self, session: Session) -> None:
        """Add every delta to its row (creating rows as needed), in the caller's transaction;
        the variant rows' deltas also to their hours (rollup.HourDeltas), last."""
        hours = HourDeltas()
        for (deployment, variant, bucket), d in sorted(self.variants.items()):
            session.execute(
                insert(VariantMetrics)
                .values(
                    deployment=deployment,
                    variant=variant,
                    bucket_start=bucket,
                    shadow=d.shadow,
                    model_version=d.model_version,
                    score_histogram=[0] * SCORE_BINS,
                    latency_histogram=[0] * (len(LATENCY_EDGES_MS) + 1),
                )
                .on_conflict_do_nothing()
            )
            row = session.scalars(
                select(VariantMetrics)
                .where(
                    VariantMetrics.deployment == deployment,
                    VariantMetrics.variant == variant,
                    VariantMetrics.bucket_start == bucket,
                )
                .with_for_update()
            ).one()
            row.shadow = row.shadow or d.shadow
            if d.model_version is not None:
                row.model_version = d.model_version
            row.predictions += d.predictions
            row.dead_letters += d.dead_letters
            row.score_sum += d.score_sum
            row.score_histogram = _add(list(row.score_histogram), d.score_histogram)
            row.latency_histogram = _add(list(row.latency_histogram), d.latency_histogram)
            if any(d.end_to_end_histogram):  # a row nothing measured stays [] (no data)
                row.end_to_end_histogram = _add(
                    list(row.end_to_end_histogram), d.end_to_end_histogram
                )
            row.outcomes += d.outcomes
            row.correct += d.correct
            row.log_loss_sum += d.log_loss_sum
            row.squared_error_sum += d.squared_error_sum
            row.absolute_error_sum += d.absolute_error_sum
            hours.add(row, d)
        for (deployment, bucket), o in sorted(self.outcomes.items()):
            session.execute(
                insert(OutcomeStats)
                .values(deployment=deployment, bucket_start=bucket)
                .on_conflict_do_nothing()
            )
            stats = session.scalars(
                select(OutcomeStats)
                .where(OutcomeStats.deployment == deployment, OutcomeStats.bucket_start == bucket)
                .with_for_update()
            ).one()
            stats.matched += o.matched
            stats.late += o.late
            stats.unmatched += o.unmatched
            stats.invalid += o.invalid
            stats.expired_predictions += o.expired_predictions
        for (deployment, feature, bucket), f in sorted(self.drift.items()):
            session.execute(
                insert(FeatureDrift)
                .values(
                    deployment=deployment,
                    feature=feature,
                    bucket_start=bucket,
                    model_version_id=f.model_version_id,
                    counts=[0] * len(f.counts),
                )
                .on_conflict_do_nothing()
            )
            drift = session.scalars(
                select(FeatureDrift)
                .where(
                    FeatureDrift.deployment == deployment,
                    FeatureDrift.feature == feature,
                    FeatureDrift.bucket_start == bucket,
                )
                .with_for_update()
            ).one()
            drift.counts = _add(list(drift.counts), f.counts)
            drift.missing += f.missing
            drift.model_version_id = f.model_version_id
        session.flush()
        # After every minute row (locks in one order across monitors: minutes, then hours).
        hours.flush(session)


def as_float(value: Any) -> float | None:
    """A finite float from a JSON value (bools are 0/1), or None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        number = float(value)
        return number if number == number and abs(number) != float("inf") else None
    return None
