"""The DuckDB fast path equals the reference operator on random streams with ties, out-of-order
and late events, gaps that expire state, NaNs and empty windows (hypothesis)."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from carrara.features import duck
from carrara.features.operator import PartitionedOperator
from carrara.features.plan import LatePolicy
from carrara.features.sql import parse_feature_sql
from tests.unit.test_features_operator import SQL, amounts, steps

FIELDS = {"amount": "float", "merchant": "category"}
EXTRA = """SELECT LN(amount + 1) AS log_amount, ts AS t, LOWER(merchant) AS m,
  COUNT(DISTINCT merchant) OVER (PARTITION BY card ORDER BY ts RANGE INTERVAL '2' SECOND PRECEDING)
    AS d2,
  ts - LAG(ts, 1, 0) OVER (PARTITION BY card ORDER BY ts) AS since_or_epoch,
  LAG(merchant) OVER (PARTITION BY card ORDER BY ts) AS previous_merchant
FROM payments"""
events_strategy = st.lists(
    st.tuples(
        st.integers(0, 1),  # partition
        st.sampled_from(["a", "b", "c"]),
        steps,
        amounts,
        st.sampled_from([None, "M1", "m2"]),
    ),
    max_size=50,
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
    return a == b


@settings(max_examples=100, deadline=None)
@given(
    events_strategy,
    st.sampled_from([SQL, EXTRA]),
    st.sampled_from([LatePolicy.cap, LatePolicy.drop]),
    st.sampled_from([0, 1000]),
)
def test_duckdb_equals_the_operator(raw, sql, policy, lateness) -> None:
    plan = parse_feature_sql(
        sql,
        key_field="card",
        time_field="ts",
        fields=FIELDS,
        late_policy=policy,
        allowed_lateness_ms=lateness,
    )
    t = {0: 1_700_000_000_000, 1: 1_700_000_000_000}
    log = []
    for partition, key, step, amount, merchant in raw:
        t[partition] += step
        fields = {"amount": amount, "merchant": merchant, "card": key}
        # A key lives in one partition, as with Kafka's key partitioning.
        log.append(duck.LogEvent(partition, f"{key}{partition}", t[partition], fields))
    operator = PartitionedOperator(plan)
    want = [operator.process(e.partition, e.key, e.time_ms, e.fields) for e in log]
    got = duck.compute(plan, log)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g.time_ms, g.late, g.stored) == (w.time_ms, w.late, w.stored), i
        for name, gv, wv in zip(plan.names, g.values, w.values, strict=True):
            assert same(gv, wv), (i, name, gv, wv)


def test_a_set_without_windows_and_an_empty_log() -> None:
    plan = parse_feature_sql(
        "SELECT amount * 2 AS double", key_field="card", time_field="ts", fields=FIELDS
    )
    assert duck.compute(plan, []) == []
    got = duck.compute(
        plan, [duck.LogEvent(0, "a", 5, {"amount": 2}), duck.LogEvent(0, "a", 1, {})]
    )
    assert (got[0].values, got[0].time_ms, got[0].late) == ([4.0], 5, False)
    assert math.isnan(got[1].values[0])
    assert (got[1].time_ms, got[1].late) == (1, False)  # no windows: no state, no capping
