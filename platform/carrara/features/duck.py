"""The DuckDB fast path: a feature set over a whole log in two queries, with the operator's
semantics.

For previews and backfills over many events. The reference is the incremental operator
(`operator.py`); a hypothesis test holds the two equal on random streams (ties, out-of-order and
late events, gaps that expire state, NaNs, empty windows). How the semantics become SQL:

- The partition clock before an event is the running max of the raw times before it in its
  partition, and the key's latest time the running max of its raw times: capping never raises a
  time above what was seen, and while a key is not expired its latest time is that running max.
  The key's state is forgotten (a new *segment*) when the clock is more than H past that max; an
  event after a forgotten state is fresh (not capped, not late).
- A window is a range join on (partition, key, segment), earlier-or-same log position, kept events
  (a `drop`-policy late event sees itself only) and `t_j >= t_i - W`: same-time events at later
  offsets are never counted, which DuckDB's plain `RANGE` frame gets wrong (the README's
  "Features in SQL" states the semantics).
- Per-event expressions and window arguments are the plan's own compiled expressions, evaluated in
  Python: only the stateful part runs in DuckDB. Sums are `fsum`; results are equal to the
  operator's up to floating-point rounding (STDDEV's algorithm differs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from carrara.features.operator import ProcessedEvent
from carrara.features.plan import Aggregate, FeaturePlan, LatePolicy


@dataclass(frozen=True)
class LogEvent:
    """One event of a log, in log order within its partition."""

    partition: int
    key: str
    time_ms: int
    fields: Mapping[str, Any]


_NUMERIC_ONLY = {
    Aggregate.sum,
    Aggregate.avg,
    Aggregate.min,
    Aggregate.max,
    Aggregate.stddev_samp,
    Aggregate.stddev_pop,
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _encode(v: Any) -> str | None:
    """A value as text that keeps its type (COUNT DISTINCT and LAG over mixed values)."""
    if v is None:
        return None
    if isinstance(v, str):
        return "s" + v
    return "n" + repr(float(v))


def _decode(text: Any) -> Any:
    if not isinstance(text, str):
        return text  # NULL, or a value of a DOUBLE column
    return text[1:] if text[0] == "s" else float(text[1:])


def compute(plan: FeaturePlan, events: Sequence[LogEvent]) -> list[ProcessedEvent]:
    """The features of every event of `events` (each partition's events in log order)."""
    if not events:
        return []
    con = duckdb.connect()
    try:
        return _compute(con, plan, events)
    finally:
        con.close()


def _compute(
    con: duckdb.DuckDBPyConnection, plan: FeaturePlan, events: Sequence[LogEvent]
) -> list[ProcessedEvent]:
    horizon = plan.horizon_ms
    con.execute("CREATE TABLE ev (pos BIGINT, part INTEGER, k VARCHAR, t_raw BIGINT)")
    con.executemany(
        "INSERT INTO ev VALUES (?, ?, ?, ?)",
        [(i, e.partition, e.key, e.time_ms) for i, e in enumerate(events)],
    )
    times = con.execute(
        f"""
        WITH a AS (
          SELECT *,
            max(t_raw) OVER (PARTITION BY part ORDER BY pos
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS clock,
            max(t_raw) OVER (PARTITION BY part, k ORDER BY pos
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS m
          FROM ev
        ), b AS (SELECT *, (m IS NULL OR clock - m > {horizon}) AS fresh FROM a)
        SELECT pos,
          CASE WHEN fresh THEN t_raw ELSE greatest(t_raw, m) END AS t,
          (NOT fresh AND m - t_raw > {plan.allowed_lateness_ms}) AS late,
          sum(CASE WHEN fresh THEN 1 ELSE 0 END)
            OVER (PARTITION BY part, k ORDER BY pos ROWS UNBOUNDED PRECEDING) AS seg
        FROM b ORDER BY pos
        """  # noqa: S608 (numbers from the plan, not input)
    ).fetchall()
    if not plan.windows:  # a set without windows keeps no state: times are not capped
        times = [(i, e.time_ms, False, 0) for i, e in enumerate(events)]
    drop = plan.late_policy is LatePolicy.drop
    numeric_args = {
        call.arg
        for call in plan.windows
        if call.aggregate in _NUMERIC_ONLY and call.arg is not None
    }
    minmax_args = {
        call.arg
        for call in plan.windows
        if call.aggregate in (Aggregate.min, Aggregate.max) and call.arg is not None
    }
    table_rows = []
    for (pos, t, late, seg), event in zip(times, events, strict=True):
        context = [t / 1000.0]
        args = tuple(arg(event.fields, context) for arg in plan.args)
        stored = not (late and drop)
        cells: list[Any] = []
        for i, v in enumerate(args):
            if i in minmax_args and isinstance(v, str):
                raise ValueError("MIN/MAX over strings has no DuckDB fast path: use the operator")
            if i in numeric_args:
                cells.append(float(v) if _is_number(v) or isinstance(v, bool) else None)
            else:
                cells.append(_encode(v))
        table_rows.append((pos, event.partition, event.key, int(seg), int(t), stored, *cells))
    columns = ", ".join(
        f"a{i} {'DOUBLE' if i in numeric_args else 'VARCHAR'}" for i in range(len(plan.args))
    )
    con.execute(
        "CREATE TABLE w (pos BIGINT, part INTEGER, k VARCHAR, seg BIGINT, t BIGINT, "
        f"stored BOOLEAN{', ' + columns if columns else ''})"
    )
    placeholders = ", ".join("?" for _ in range(6 + len(plan.args)))
    con.executemany(f"INSERT INTO w VALUES ({placeholders})", table_rows)  # noqa: S608

    window_values: list[list[Any]] = [[] for _ in events]
    if plan.windows:
        selects = []
        for call in plan.windows:
            a = f"j.a{call.arg}"
            if call.aggregate is Aggregate.lag:
                selects.append(
                    f"list({a} ORDER BY j.pos DESC) FILTER (WHERE j.pos < i.pos AND j.stored)"
                )
                continue
            cond = f"FILTER (WHERE j.t >= i.t - {call.window_ms})"
            selects.append(
                {
                    Aggregate.count_star: f"count(*) {cond}",
                    Aggregate.count_values: f"count({a}) {cond}",
                    Aggregate.count_distinct: f"count(DISTINCT {a}) {cond}",
                    Aggregate.sum: f"fsum({a}) {cond}",
                    Aggregate.avg: f"fsum({a}) {cond} / nullif(count({a}) {cond}, 0)",
                    Aggregate.min: f"min({a}) {cond}",
                    Aggregate.max: f"max({a}) {cond}",
                    Aggregate.stddev_samp: f"stddev_samp({a}) {cond}",
                    Aggregate.stddev_pop: f"stddev_pop({a}) {cond}",
                }[call.aggregate]
            )
        query = f"""
            SELECT i.pos, {", ".join(selects)}
            FROM w i JOIN w j
              ON j.part = i.part AND j.k = i.k AND j.seg = i.seg AND j.pos <= i.pos
             AND j.t >= i.t - {horizon} AND (j.stored OR j.pos = i.pos)
            GROUP BY i.pos ORDER BY i.pos
        """  # noqa: S608 (the plan's own column names and numbers)
        for row in con.execute(query).fetchall():
            values = []
            for call, value in zip(plan.windows, row[1:], strict=True):
                if call.aggregate is Aggregate.lag:
                    items = value or []
                    n = call.lag_offset
                    value = _decode(items[n - 1]) if len(items) >= n else None
                elif call.aggregate in (Aggregate.count_star, Aggregate.count_values) or (
                    call.aggregate is Aggregate.count_distinct
                ):
                    value = float(value or 0)
                elif isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
                    value = None if math.isnan(value) else value
                values.append(value)
            window_values[row[0]] = values
    results = []
    for (_, t, late, _), event, windows in zip(times, events, window_values, strict=True):
        context = [*windows, t / 1000.0]
        out = []
        for output in plan.outputs:
            value = output.compute(event.fields, context)
            if output.kind == "number":
                value = math.nan if value is None else float(value)
            out.append(value)
        results.append(ProcessedEvent(out, int(t), bool(late), not (late and drop)))
    return results
