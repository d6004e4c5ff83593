"""The hourly rollup of variant_metrics: what long windows read equals summing the minute rows.

Minute deltas are written through the monitor's own flush (several flushes adding to the same
minutes, shadow flags, model versions changing within an hour, minutes without end-to-end data),
then every window shape (aligned, ragged at either end, shorter than an hour, days) is read with
and without the rollup. Float values are multiples of 1/8, so sums are exact in any order and the
two reads must be identical, not close.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import VariantMetricsHourly
from carrara.monitoring.aggregates import Deltas
from carrara.monitoring.rollup import bucket_sums, rebuild_hourly

BASE = datetime(2024, 6, 3, 0, 0, tzinfo=UTC)
DEPLOYMENTS = ("rollup-a", "rollup-b")


def _write_minutes(session: Session, rng: random.Random) -> None:
    """Three days of sparse minutes for two deployments, in several flushes."""
    for flush in range(6):
        deltas = Deltas()
        for _ in range(400):
            deployment = rng.choice(DEPLOYMENTS)
            variant = rng.choice(("a", "b", "s", "-"))
            minute = BASE + timedelta(minutes=rng.randrange(3 * 24 * 60))
            d = deltas.variant(deployment, variant, minute)
            d.shadow = d.shadow or (variant == "s" and rng.random() < 0.5)
            if variant != "-":
                d.model_version = rng.choice((1, 2, 3)) if rng.random() < 0.8 else None
            n = rng.randrange(1, 50)
            d.predictions += n
            d.dead_letters += rng.randrange(3)
            d.score_sum += rng.randrange(0, 8 * n) / 8
            d.score_histogram[rng.randrange(len(d.score_histogram))] += n
            d.latency_histogram[rng.randrange(len(d.latency_histogram))] += n
            if flush % 2:  # other minutes keep `[]` (no end-to-end data)
                d.end_to_end_histogram[rng.randrange(len(d.end_to_end_histogram))] += n
            d.outcomes += rng.randrange(n)
            d.correct += rng.randrange(d.outcomes + 1)
            d.log_loss_sum += rng.randrange(64) / 8
            d.squared_error_sum += rng.randrange(64) / 8
            d.absolute_error_sum += rng.randrange(64) / 8
        deltas.flush(session)


def _hourly_rows(session: Session) -> list[tuple[Any, ...]]:
    h = VariantMetricsHourly
    rows = session.execute(
        select(h)
        .where(h.deployment.in_(DEPLOYMENTS))
        .order_by(h.deployment, h.variant, h.bucket_start)
    ).scalars()
    columns = [c.key for c in h.__table__.columns]
    return [tuple(getattr(r, c) for c in columns) for r in rows]


WINDOWS = [
    (BASE, BASE + timedelta(days=3)),  # whole hours only
    (BASE + timedelta(minutes=17), BASE + timedelta(days=2, minutes=43)),  # ragged both ends
    (BASE + timedelta(minutes=59), BASE + timedelta(hours=5)),  # ragged start
    (BASE + timedelta(hours=2), BASE + timedelta(hours=30, minutes=1)),  # ragged end
    (BASE + timedelta(minutes=10), BASE + timedelta(minutes=50)),  # inside one hour
    (BASE + timedelta(minutes=30), BASE + timedelta(hours=1, minutes=30)),  # no whole hour
    (BASE - timedelta(days=1), BASE + timedelta(days=5)),  # wider than the data
]


@pytest.mark.parametrize("bucket", ["hour", "day"])
def test_rollup_reads_equal_summing_minutes(db_session: Session, bucket: str) -> None:
    _write_minutes(db_session, random.Random(19))
    for deployment in DEPLOYMENTS:
        for start, end in WINDOWS:
            minutes = bucket_sums(db_session, deployment, start, end, bucket, use_rollup=False)
            rolled = bucket_sums(db_session, deployment, start, end, bucket)
            assert minutes, (deployment, start, end)
            assert rolled == minutes, (deployment, start, end, bucket)


def test_incremental_hours_equal_a_rebuild_from_minutes(db_session: Session) -> None:
    _write_minutes(db_session, random.Random(23))
    incremental = _hourly_rows(db_session)
    assert len(incremental) > 100
    for deployment in DEPLOYMENTS:
        rebuild_hourly(db_session, deployment)
    db_session.expire_all()
    assert _hourly_rows(db_session) == incremental
