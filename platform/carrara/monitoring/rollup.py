"""The minute rows of `variant_metrics` and their hourly rollup (`variant_metrics_hourly`).

Writing: the monitor's flush (carrara.monitoring.aggregates) adds each minute row's delta to the
row's hour in the same transaction (`add_to_hours`), after every minute row, in key order, by an
atomic upsert: monitors sharing a deployment lock minute rows, then hours, in one order, and
never lose each other's counts. `rebuild_hourly` recomputes hours from minutes (after a bulk
load; it must not run while monitors write the same hours).

Reading (`bucket_sums`): per (variant, bucket) sums of a window. Minute buckets read minute rows;
hour and day buckets read the window's whole hours from the rollup and the minutes of its ragged
edges, and sum them the same way, so the result equals summing the minutes (counts exactly; the
float sums up to the order of additions). Each bucket reports the model version of its newest
minute row, as the minute read does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    bindparam,
    delete,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by, array, insert
from sqlalchemy.orm import Session

from carrara.models import VariantMetrics, VariantMetricsHourly
from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS, SCORE_BINS

HOUR = timedelta(hours=1)
HISTOGRAMS = (
    ("score_histogram", SCORE_BINS),
    ("latency_histogram", len(LATENCY_EDGES_MS) + 1),
    ("end_to_end_histogram", len(END_TO_END_EDGES_MS) + 1),
)
SUMS = (
    "predictions",
    "dead_letters",
    "score_sum",
    "outcomes",
    "correct",
    "log_loss_sum",
    "squared_error_sum",
    "absolute_error_sum",
)


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# --- writing ------------------------------------------------------------------------------------


@dataclass
class HourDelta:
    """What one flush adds to an hour: summed minute deltas, and the newest minute it touched
    with that minute row's model version and shadow flag after the flush."""

    newest_minute: datetime
    model_version: int | None
    shadow: bool
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMS, 0))
    histograms: dict[str, list[int]] = field(
        default_factory=lambda: {name: [0] * size for name, size in HISTOGRAMS}
    )


class HourDeltas:
    """Collects a flush's minute deltas per (deployment, variant, hour)."""

    def __init__(self) -> None:
        self.hours: dict[tuple[str, str, datetime], HourDelta] = {}

    def add(self, row: VariantMetrics, delta: Any) -> None:
        """Add `delta` (a VariantDelta: the SUMS fields and the histograms) of minute `row`,
        whose columns already hold the flush's result."""
        minute = row.bucket_start
        key = (row.deployment, row.variant, hour_of(minute))
        hour = self.hours.get(key)
        if hour is None:
            hour = self.hours[key] = HourDelta(minute, row.model_version, row.shadow)
        elif minute >= hour.newest_minute:
            hour.newest_minute, hour.model_version = minute, row.model_version
        hour.shadow = hour.shadow or row.shadow
        for name in SUMS:
            hour.sums[name] += getattr(delta, name)
        for name, size in HISTOGRAMS:
            counts: list[int] = getattr(delta, name)
            target = hour.histograms[name]
            for i, count in enumerate(counts[:size]):
                target[i] += count

    def flush(self, session: Session) -> None:
        """Upsert every hour, in key order (after the minute rows: see the module docstring)."""
        for (deployment, variant, bucket), hour in sorted(self.hours.items()):
            session.execute(
                _UPSERT,
                {
                    "deployment": deployment,
                    "variant": variant,
                    "bucket_start": bucket,
                    "newest_minute": hour.newest_minute,
                    "model_version": hour.model_version,
                    "shadow": hour.shadow,
                    **hour.sums,
                    **hour.histograms,
                },
            )


def _add_arrays(column: str) -> str:
    return (  # the column names are this module's constants
        f"ARRAY(SELECT coalesce(x, 0) + coalesce(y, 0) FROM unnest(t.{column}, "  # noqa: S608
        f"excluded.{column}) WITH ORDINALITY AS u(x, y, i) ORDER BY i)"
    )


_COLUMNS = ("deployment", "variant", "bucket_start", "newest_minute", "model_version", "shadow")
# Element-wise sums of the histograms; the column names are this module's constants.
_UPSERT = text(
    f"INSERT INTO variant_metrics_hourly AS t ({', '.join(_COLUMNS + SUMS)}, "  # noqa: S608
    f"{', '.join(n for n, _ in HISTOGRAMS)}) VALUES ("
    + ", ".join(f":{c}" for c in _COLUMNS + SUMS)
    + ", "
    + ", ".join(f"CAST(:{n} AS bigint[])" for n, _ in HISTOGRAMS)
    + ") ON CONFLICT (deployment, variant, bucket_start) DO UPDATE SET "
    "model_version = CASE WHEN excluded.newest_minute >= t.newest_minute "
    "THEN excluded.model_version ELSE t.model_version END, "
    "newest_minute = greatest(t.newest_minute, excluded.newest_minute), "
    "shadow = t.shadow OR excluded.shadow, "
    + ", ".join(f"{c} = t.{c} + excluded.{c}" for c in SUMS)
    + ", "
    + ", ".join(f"{n} = {_add_arrays(n)}" for n, _ in HISTOGRAMS)
)


def rebuild_hourly(session: Session, deployment: str | None = None) -> None:
    """Recompute the hours of `deployment` (default: every one) from its minute rows."""
    vm = VariantMetrics
    hour = func.date_trunc(literal_column("'hour'"), vm.bucket_start, literal_column("'UTC'"))
    newest_version = func.array_agg(aggregate_order_by(vm.model_version, vm.bucket_start.desc()))
    where = [] if deployment is None else [vm.deployment == deployment]
    rows = (
        select(
            vm.deployment,
            vm.variant,
            hour,
            func.max(vm.bucket_start),
            newest_version[1],
            func.bool_or(vm.shadow),
            *(func.sum(getattr(vm, name)) for name in SUMS),
            *(_array_of_sums(getattr(vm, name), size) for name, size in HISTOGRAMS),
        )
        .where(*where)
        .group_by(vm.deployment, vm.variant, hour)
    )
    hourly = VariantMetricsHourly
    gone = [] if deployment is None else [hourly.deployment == deployment]
    session.execute(delete(hourly).where(*gone))
    names = [*_COLUMNS, *SUMS, *(n for n, _ in HISTOGRAMS)]
    session.execute(insert(hourly).from_select(names, rows))


def _array_of_sums(column: Any, size: int) -> ColumnElement[Any]:
    """ARRAY[sum(column->>0), ..., sum(column->>size-1)] (0 where no row has the bin)."""
    return array(
        [func.coalesce(func.sum(column.op("->>")(k).cast(BigInteger)), 0) for k in range(size)],
        type_=BigInteger,
    )


# --- reading ------------------------------------------------------------------------------------


def _minute_rows(where: Sequence[ColumnElement[bool]]) -> Select[*tuple[Any, ...]]:
    vm = VariantMetrics
    return select(
        vm.variant.label("variant"),
        vm.bucket_start.label("at"),
        vm.bucket_start.label("newest"),
        vm.shadow.label("shadow"),
        vm.model_version.label("model_version"),
        *(getattr(vm, name).label(name) for name in SUMS),
        *(
            getattr(vm, name).op("->>")(k).cast(BigInteger).label(f"{name}_{k}")
            for name, size in HISTOGRAMS
            for k in range(size)
        ),
    ).where(*where)


def _hour_rows(where: Sequence[ColumnElement[bool]]) -> Select[*tuple[Any, ...]]:
    h = VariantMetricsHourly
    return select(
        h.variant.label("variant"),
        h.bucket_start.label("at"),
        h.newest_minute.label("newest"),
        h.shadow.label("shadow"),
        h.model_version.label("model_version"),
        *(getattr(h, name).label(name) for name in SUMS),
        *(
            getattr(h, name)[k + 1].label(f"{name}_{k}")
            for name, size in HISTOGRAMS
            for k in range(size)
        ),
    ).where(*where)


def whole_hours(start: datetime, end: datetime) -> tuple[datetime, datetime] | None:
    """The whole hours [first, last) inside [start, end), if any."""
    first = hour_of(start)
    if first < start:
        first += HOUR
    last = hour_of(end)
    return (first, last) if first < last else None


def bucket_sums(
    session: Session,
    name: str,
    start: datetime,
    end: datetime,
    bucket: str,
    *,
    use_rollup: bool = True,
) -> list[tuple[Any, ...]]:
    """Rows (variant, bucket start, shadow of any row, model version of the newest minute, the
    SUMS, then every histogram bin in HISTOGRAMS order) per variant and `bucket`, in order.

    A bin no row has (a minute's `[]`: no end-to-end data) sums to 0, as the rollup's do."""
    hours = whole_hours(start, end) if use_rollup and bucket != "minute" else None
    params: dict[str, Any] = {"name": name, "start": start, "end": end}
    if hours is not None:
        params["first"], params["last"] = hours
    return [tuple(row) for row in session.execute(_statement(bucket, hours is not None), params)]


@lru_cache
def _statement(bucket: str, rollup: bool) -> Select[*tuple[Any, ...]]:
    """The query of `bucket_sums`, built once per bucket size and source (~150 expressions:
    building them per request cost more than running the query)."""
    vm = VariantMetrics
    name, start, end = bindparam("name"), bindparam("start"), bindparam("end")
    if not rollup:
        source = _minute_rows(
            [vm.deployment == name, vm.bucket_start >= start, vm.bucket_start < end]
        )
    else:
        first, last = bindparam("first"), bindparam("last")
        h = VariantMetricsHourly
        edges = or_(
            and_(vm.bucket_start >= start, vm.bucket_start < first),
            and_(vm.bucket_start >= last, vm.bucket_start < end),
        )
        source = union_all(
            _minute_rows([vm.deployment == name, edges]),
            _hour_rows([h.deployment == name, h.bucket_start >= first, h.bucket_start < last]),
        )
    rows = source.subquery("rows")
    c = rows.c
    # The unit is one of BUCKETS (checked by the caller): a literal, so select and GROUP BY agree.
    truncated = func.date_trunc(literal_column(f"'{bucket}'"), c.at, literal_column("'UTC'")).label(
        "b"
    )
    newest_version = func.array_agg(aggregate_order_by(c.model_version, c.newest.desc()))[1]
    return (
        select(
            c.variant,
            truncated,
            func.bool_or(c.shadow),
            newest_version,
            *(func.sum(c[name]) for name in SUMS),
            *(
                func.coalesce(func.sum(c[f"{name}_{k}"]), 0)
                for name, size in HISTOGRAMS
                for k in range(size)
            ),
        )
        .group_by(c.variant, truncated)
        .order_by(c.variant, truncated)
    )
