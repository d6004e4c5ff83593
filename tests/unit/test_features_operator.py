"""The feature operator against a brute-force reference written directly from the semantics
(README: Features in SQL), on random streams with ties, out-of-order and late events, gaps that
expire state, NaNs and empty windows; plus changelog restore and expiry being invisible."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carrara.features.operator import FeatureOperator, KeyState, event_time_ms
from carrara.features.plan import LatePolicy
from carrara.features.sql import parse_feature_sql

W10, W30 = 10_000, 30_000  # ms
OVER = "OVER (PARTITION BY card ORDER BY ts RANGE INTERVAL '{}' SECOND PRECEDING)"
LAG = "OVER (PARTITION BY card ORDER BY ts)"
SQL = f"""
SELECT amount,
       COUNT(*) {OVER.format(10)} AS n10,
       SUM(amount) {OVER.format(10)} AS s10,
       AVG(amount) {OVER.format(30)} AS a30,
       MIN(amount) {OVER.format(30)} AS min30,
       MAX(amount) {OVER.format(10)} AS max10,
       COUNT(amount) {OVER.format(30)} AS c30,
       COUNT(DISTINCT merchant) {OVER.format(30)} AS d30,
       STDDEV(amount) {OVER.format(30)} AS sd30,
       STDDEV_POP(amount) {OVER.format(10)} AS sdp10,
       ts - LAG(ts) {LAG} AS since,
       LAG(amount, 2) {LAG} AS lag2
FROM payments
"""  # noqa: S608 (constants, not input)
FIELDS = {"amount": "float", "merchant": "category"}


def plan(policy: LatePolicy = LatePolicy.cap, lateness: int = 0):
    return parse_feature_sql(
        SQL,
        key_field="card",
        time_field="ts",
        fields=FIELDS,
        dataset="payments",
        late_policy=policy,
        allowed_lateness_ms=lateness,
    )


def reference(events: list[tuple[str, int, Any, Any]], policy: LatePolicy, lateness: int):
    """Each event's features, straight from the written semantics (quadratic, no state)."""
    horizon = W30
    stored: list[tuple[str, int, Any, Any]] = []  # (key, time, amount, merchant) in log order
    forgotten: dict[str, int] = {}  # key -> len(stored) when its state was forgotten
    clock: int | None = None
    rows = []
    for key, raw, amount, merchant in events:
        prior = [e for e in stored[forgotten.get(key, 0) :] if e[0] == key]
        if prior and clock is not None and clock - prior[-1][1] > horizon:
            forgotten[key] = len(stored)
            prior = []
        t, late = raw, False
        if prior and raw < prior[-1][1]:
            late = prior[-1][1] - raw > lateness
            t = prior[-1][1]
        amt = (
            None if amount is None or (isinstance(amount, float) and math.isnan(amount)) else amount
        )
        current = (key, t, amt, merchant)

        def window(width: int) -> list[tuple[str, int, Any, Any]]:
            return [e for e in prior if e[1] >= t - width] + [current]  # noqa: B023

        def amounts(width: int) -> list[float]:
            return [float(e[2]) for e in window(width) if e[2] is not None]

        recent = [e for e in prior if e[1] >= t - horizon]
        a10, a30 = amounts(W10), amounts(W30)
        rows.append(
            {
                "amount": math.nan if amt is None else float(amt),
                "n10": float(len(window(W10))),
                "s10": sum(a10) if a10 else math.nan,
                "a30": statistics.fmean(a30) if a30 else math.nan,
                "min30": min(a30) if a30 else math.nan,
                "max10": max(a10) if a10 else math.nan,
                "c30": float(len(a30)),
                "d30": float(len({e[3] for e in window(W30) if e[3] is not None})),
                "sd30": statistics.stdev(a30) if len(a30) >= 2 else math.nan,
                "sdp10": statistics.pstdev(a10) if a10 else math.nan,
                "since": t / 1000 - recent[-1][1] / 1000 if recent else math.nan,
                "lag2": (
                    math.nan if len(recent) < 2 or recent[-2][2] is None else float(recent[-2][2])
                ),
            }
        )
        if not (late and policy is LatePolicy.drop):
            stored.append(current)
        clock = t if clock is None else max(clock, t)
    return rows


def same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


amounts = st.one_of(
    st.none(),
    st.just(math.nan),
    st.integers(-5, 100),
    st.floats(-1e6, 1e6, allow_nan=False),
)
# Steps between consecutive times: ties (0), small moves, out-of-order (negative), gaps past H.
steps = st.sampled_from([0, 0, 0, 500, 1000, 3000, 9999, 10_000, 10_001, -2000, -15_000, 45_000])
streams = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]), steps, amounts, st.sampled_from([None, "m1", "m2", "m3"])
    ),
    max_size=60,
)


def as_events(raw: list[tuple[str, int, Any, Any]]) -> list[tuple[str, int, Any, Any]]:
    t, events = 1_700_000_000_000, []
    for key, step, amount, merchant in raw:
        t += step
        events.append((key, t, amount, merchant))
    return events


def run(op: FeatureOperator, events: list[tuple[str, int, Any, Any]]) -> list[dict[str, Any]]:
    names = op.plan.names
    rows = []
    for key, t, amount, merchant in events:
        result = op.process(key, t, {"amount": amount, "merchant": merchant, "card": key})
        rows.append(dict(zip(names, result.values, strict=True)))
    return rows


@settings(max_examples=150, deadline=None)
@given(
    streams,
    st.sampled_from([LatePolicy.cap, LatePolicy.drop]),
    st.sampled_from([0, 1000, 20_000]),
)
def test_the_operator_equals_the_reference(raw, policy, lateness) -> None:
    events = as_events(raw)
    got = run(FeatureOperator(plan(policy, lateness)), events)
    want = reference(events, policy, lateness)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in w:
            assert same(g[name], w[name]), (i, name, g[name], w[name], events[: i + 1])


@settings(max_examples=80, deadline=None)
@given(streams, st.integers(0, 60), st.sampled_from([LatePolicy.cap, LatePolicy.drop]))
def test_restoring_from_the_changelog_and_expiring_change_nothing(raw, cut, policy) -> None:
    events = as_events(raw)
    cut = min(cut, len(events))
    whole = run(FeatureOperator(plan(policy)), events)

    first = FeatureOperator(plan(policy))
    head = run(first, events[:cut])
    changelog = list(first.take_changes().items())  # what a scorer writes inside its transaction
    first.expire()
    changelog += list(first.take_changes().items())
    second = FeatureOperator(plan(policy))
    second.restore(changelog)
    assert second.clock == first.clock
    tail = []
    for event in events[cut:]:
        tail += run(second, [event])
        second.expire()  # any time: invisible in the results
    for i, (g, w) in enumerate(zip(head + tail, whole, strict=True)):
        for name in w:
            assert g[name] == w[name] or (math.isnan(g[name]) and math.isnan(w[name])), (i, name)


def test_ties_do_not_see_later_offsets_and_out_of_order_is_capped() -> None:
    op = FeatureOperator(plan())
    rows = run(op, [("a", 5000, 1, "m1"), ("a", 5000, 2, "m2"), ("a", 4000, 4, "m1")])
    assert [r["n10"] for r in rows] == [1.0, 2.0, 3.0]  # the first does not see its tie
    assert [r["s10"] for r in rows] == [1.0, 3.0, 7.0]
    assert rows[2]["since"] == 0.0  # processed at the key's latest time, 5 s


def test_the_drop_policy_scores_a_late_event_but_keeps_it_out_of_the_state() -> None:
    op = FeatureOperator(plan(LatePolicy.drop, lateness=500))
    rows = run(
        op,
        [
            ("a", 5000, 1, None),
            ("a", 4800, 2, None),  # within the allowed lateness: capped and kept
            ("a", 1000, 4, None),  # late: scored at 5 s with itself, then dropped
            ("a", 6000, 8, None),
        ],
    )
    assert [r["s10"] for r in rows] == [1.0, 3.0, 7.0, 11.0]
    assert rows[2]["n10"] == 3.0


def test_windows_are_closed_at_both_ends_and_state_expires_past_the_longest() -> None:
    op = FeatureOperator(plan())
    rows = run(op, [("a", 0, 1, None), ("a", 10_000, 2, None), ("a", 10_001, 4, None)])
    assert [r["n10"] for r in rows] == [1.0, 2.0, 2.0]  # t - 10 s is inside; 1 ms earlier is not
    run(op, [("b", 40_002, 1, None)])  # the partition clock passes a's latest + 30 s
    assert op.expire() == ["a"]
    assert op.take_changes() == {"a": None, "b": op.keys["b"].to_bytes()}


def test_nan_and_null_are_skipped_and_empty_aggregates_are_null() -> None:
    rows = run(FeatureOperator(plan()), [("a", 0, math.nan, None), ("a", 1, None, None)])
    assert rows[1]["n10"] == 2.0
    assert rows[1]["c30"] == 0.0
    assert rows[1]["d30"] == 0.0
    assert all(math.isnan(rows[1][n]) for n in ("s10", "a30", "min30", "max10", "sd30", "lag2"))


def test_state_bytes_round_trip() -> None:
    state = KeyState(5)
    state.times, state.columns = [1, 5], [[1.5, math.inf], ["x", None], [None, True]]
    again = KeyState.from_bytes(state.to_bytes())
    assert (again.latest, again.times, again.columns) == (5, [1, 5], state.columns)


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (1_700_000_000, 1_700_000_000_000),
        (1_700_000_000_123, 1_700_000_000_123),
        ("2023-11-14T22:13:20Z", 1_700_000_000_000),
        ("2023-11-14T22:13:20", 1_700_000_000_000),
        ("nope", None),
        (None, None),
        (math.nan, None),
    ],
)
def test_event_times(value: Any, ms: int | None) -> None:
    assert event_time_ms(value) == ms


def test_an_event_delivered_again_is_not_stored_twice() -> None:
    """At least once: after a crash the restored state may already hold the events delivered
    again; with their offsets the operator neither counts them twice nor changes their row."""
    p = plan()
    first = FeatureOperator(p)
    events = [("a", 1000 * i, float(i), f"m{i % 2}") for i in range(6)]
    rows = [
        first.process(k, t, {"amount": x, "merchant": c, "card": k}, offset=i).values
        for i, (k, t, x, c) in enumerate(events)
    ]
    # A restore from the changelog written after offset 5, then offset 5 delivered again.
    again = FeatureOperator(p)
    again.restore(first.take_changes().items())
    k, t, x, c = events[5]
    replayed = again.process(k, t, {"amount": x, "merchant": c, "card": k}, offset=5)
    assert not replayed.stored
    assert again.keys["a"].times == first.keys["a"].times  # not stored twice
    assert _same(replayed.values, rows[5])
    # The next event counts every earlier one once.
    nxt = again.process("a", 6000, {"amount": 6.0, "merchant": "m0", "card": "a"}, offset=6)
    ref = first.process("a", 6000, {"amount": 6.0, "merchant": "m0", "card": "a"}, offset=6)
    assert _same(nxt.values, ref.values)


def _same(a: list[Any], b: list[Any]) -> bool:
    def nan(v: Any) -> bool:
        return isinstance(v, float) and math.isnan(v)

    return all(x == y or (nan(x) and nan(y)) for x, y in zip(a, b, strict=True))
