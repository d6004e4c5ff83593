"""What the read side of monitoring shares: the time window asked for, the spec a deployment last
ran with, and element-wise sums of the JSONB count arrays (histograms, drift bins) in SQL."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Select, cast, func, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session

from carrara.errors import Invalid
from carrara.models import Deployment, DeploymentRevision

BUCKETS = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}
MAX_BUCKETS = 10_000
DEFAULT_WINDOW = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc(moment: datetime) -> datetime:
    """`moment` in UTC; a time without an offset is read as UTC, as the tables store UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def window(
    start: datetime | None, end: datetime | None, default: timedelta = DEFAULT_WINDOW
) -> tuple[datetime, datetime]:
    """The [start, end) window asked for: default the last `default` up to now; Invalid if empty."""
    try:
        end = utc(end) if end is not None else datetime.now(UTC)
        start = utc(start) if start is not None else end - default
    except (OverflowError, ValueError) as exc:
        raise Invalid(f"the time window cannot be represented: {exc}") from exc
    if start >= end:
        raise Invalid(f"`from` ({start.isoformat()}) must be before `to` ({end.isoformat()})")
    return start, end


def check_bucket_count(start: datetime, end: datetime, bucket: str) -> None:
    """Invalid if [start, end) spans more than MAX_BUCKETS buckets of size `bucket`."""
    size = BUCKETS[bucket].total_seconds()
    first = math.floor((start - _EPOCH).total_seconds() / size)
    last = math.ceil((end - _EPOCH).total_seconds() / size) - 1
    count = last - first + 1
    if count > MAX_BUCKETS:
        raise Invalid(
            f"the window spans {count:,} {bucket} buckets, more than {MAX_BUCKETS:,}: "
            "narrow it or use a larger bucket"
        )


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


# A selected column: a mapped attribute or a labelled expression (`.key` names it in a subquery).
Column = ColumnElement[Any] | InstrumentedAttribute[Any]


def _key(column: Column) -> str:
    if column.key is None:
        raise ValueError(f"{column!r} has no name to select it by")
    return column.key


def summed_arrays(
    session: Session,
    rows: Select[*tuple[Any, ...]],
    array: Column,
    keys: Sequence[Column],
) -> dict[tuple[Any, ...], list[int]]:
    """Element-wise sums of the JSONB int array `array` over `rows`, grouped by `keys` (in SQL)."""
    source = rows.subquery()
    column = source.c[_key(array)]
    grouped = [source.c[_key(k)] for k in keys]
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
    for row in session.execute(stmt):
        *group, ordinal, total = tuple(row)
        values = sums.setdefault(tuple(group), [])
        values.extend([0] * (ordinal - len(values)))
        values[ordinal - 1] = int(total)
    return sums
