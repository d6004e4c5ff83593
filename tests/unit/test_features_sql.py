"""The feature SQL subset: what parses, what each expression computes, and precise errors."""

from __future__ import annotations

import math

import pytest

from carrara.features.operator import FeatureOperator
from carrara.features.plan import DEFAULT_HORIZON_MS, FeatureSqlError, OutputKind
from carrara.features.sql import parse_feature_sql

FIELDS = {"amount": "float", "merchant": "category", "country": "string", "fraud": "bool"}
ISSUE_SQL = """SELECT amount,
       LN(amount + 1)                                                  AS log_amount,
       COUNT(*)      OVER (PARTITION BY card_id ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS txn_1h,
       AVG(amount)   OVER (PARTITION BY card_id ORDER BY ts RANGE INTERVAL '24' HOUR PRECEDING) AS avg_amount_24h,
       COUNT(DISTINCT merchant) OVER (PARTITION BY card_id ORDER BY ts RANGE INTERVAL '10' MINUTE PRECEDING) AS merchants_10m,
       ts - LAG(ts) OVER (PARTITION BY card_id ORDER BY ts)            AS secs_since_last
FROM payments"""  # noqa: E501


def parse(sql: str, **kw):
    return parse_feature_sql(
        sql,
        key_field="card_id",
        time_field=kw.pop("time_field", "ts"),
        fields=FIELDS,
        label_field="fraud",
        dataset="payments",
        **kw,
    )


def one_row(sql: str, event: dict) -> dict:
    plan = parse(sql)
    result = FeatureOperator(plan).process("k", 1_000, event)
    return dict(zip(plan.names, result.values, strict=True))


def test_the_issue_example_parses() -> None:
    plan = parse(ISSUE_SQL)
    assert plan.names == [
        "amount",
        "log_amount",
        "txn_1h",
        "avg_amount_24h",
        "merchants_10m",
        "secs_since_last",
    ]
    assert plan.horizon_ms == 24 * 3_600_000
    assert [w.window_ms for w in plan.windows] == [3_600_000, 86_400_000, 600_000, None]
    assert set(plan.columns) == {"amount", "merchant", "ts"}
    assert len(plan.digest) == 64


def test_per_event_expressions() -> None:
    row = one_row(
        """SELECT ABS(-amount) AS a, SQRT(amount) AS s, LOG10(amount) AS l,
                  LEAST(amount, 2, NULL) AS lo,
                  GREATEST(amount, 2) AS hi, COALESCE(NULL, amount) AS co, LOWER(country) AS lc,
                  UPPER(country) AS uc, LENGTH(country) AS n, amount / 0 AS z, LN(0) AS ln0,
                  CASE WHEN amount > 50 THEN 'big' WHEN amount > 5 THEN 'mid' ELSE 'small' END
                    AS size,
                  CASE merchant WHEN 'm1' THEN 1 ELSE 0 END AS is_m1, amount > 5 AS gt,
                  amount IS NULL AS missing, country IN ('FR', 'DE') AS eu,
                  amount BETWEEN 1 AND 10 AS mid, ROUND(amount / 3, 2) AS r, POWER(amount, 2) AS p,
                  ts AS t, NULLIF(amount, 10) AS nz, amount % 3 AS m
           FROM payments""",
        {"amount": 10, "merchant": "m1", "country": "FR", "ts": 1},
    )
    assert row["a"] == 10.0
    assert row["s"] == math.sqrt(10)
    assert row["l"] == 1.0
    assert (row["lo"], row["hi"], row["co"]) == (2.0, 10.0, 10.0)
    assert (row["lc"], row["uc"], row["n"]) == ("fr", "FR", 2.0)
    assert math.isnan(row["z"])
    assert math.isnan(row["ln0"])
    assert math.isnan(row["nz"])
    assert (row["size"], row["is_m1"], row["gt"], row["missing"]) == ("mid", 1.0, 1.0, 0.0)
    assert (row["eu"], row["mid"], row["r"], row["p"], row["m"]) == (1.0, 1.0, 3.33, 100.0, 1.0)
    assert row["t"] == 1.0  # the event time, in epoch seconds
    kinds = {
        o.name: o.kind for o in parse("SELECT merchant, amount, country FROM payments").outputs
    }
    assert kinds == {
        "merchant": OutputKind.category,
        "amount": OutputKind.number,
        "country": OutputKind.category,
    }


def test_nulls_propagate() -> None:
    row = one_row(
        "SELECT amount + 1 AS a, LOWER(country) AS c, CASE WHEN amount > 1 THEN 1 ELSE 2 END AS k"
        " FROM payments",
        {"amount": None},
    )
    assert math.isnan(row["a"])
    assert row["c"] is None
    assert row["k"] == 2.0


def test_record_timestamp_and_lag_only_sets() -> None:
    plan = parse(
        "SELECT _timestamp - LAG(_timestamp) OVER (PARTITION BY card_id ORDER BY _timestamp)"
        " AS gap",
        time_field=None,
    )
    assert plan.horizon_ms == DEFAULT_HORIZON_MS
    assert plan.time_field == "_timestamp"


@pytest.mark.parametrize(
    ("sql", "message", "line", "column"),
    [
        ("SELECT amount FROM payments\nWHERE amount > 1", "WHERE is not supported", 2, 1),
        ("SELECT amount FROM payments GROUP BY amount", "GROUP BY is not supported", 1, 29),
        (
            "SELECT a.amount FROM payments a JOIN x b ON a.card_id = b.card_id",
            "joins across keys or topics are not supported yet",
            1,
            33,
        ),
        (
            "SELECT SUM(amount) OVER (PARTITION BY merchant ORDER BY ts"
            " RANGE INTERVAL '1' HOUR PRECEDING) AS s",
            "must be PARTITION BY card_id: the dataset's key",
            1,
            39,
        ),
        (
            "SELECT\n  SUM(amount) OVER (PARTITION BY card_id ORDER BY ts ROWS 3 PRECEDING) AS s",
            "ROWS frames are not supported",
            2,
            54,
        ),
        (
            "SELECT SUM(amount) OVER (PARTITION BY card_id ORDER BY amount"
            " RANGE INTERVAL '1' HOUR PRECEDING) AS s",
            "must be ORDER BY ts",
            1,
            56,
        ),
        (
            "SELECT SUM(amount) OVER (PARTITION BY card_id ORDER BY ts) AS s",
            "needs a frame",
            1,
            20,
        ),
        (
            "SELECT ROW_NUMBER() OVER (PARTITION BY card_id ORDER BY ts) AS r",
            "window function ROW_NUMBER is not supported",
            1,
            8,
        ),
        (
            "SELECT SUM(amount) OVER (PARTITION BY card_id ORDER BY ts"
            " RANGE INTERVAL '1' WEEK PRECEDING) AS s",
            "is not supported: a positive number of MILLISECOND",
            1,
            65,
        ),
        ("SELECT MD5(merchant) AS h", "function MD5 is not supported", 1, 8),
        ("SELECT MEDIAN(amount) AS h", "function MEDIAN is not supported", 1, 8),
        ("SELECT SUM(amount) AS s", "SUM needs an OVER", 1, 8),
        ("SELECT fraud", "it is the label", 1, 8),
        ("SELECT nope", "unknown column 'nope'", 1, 8),
        ("SELECT amount * 2", "needs a name: add AS <name>", 1, 8),
        ("SELECT amount, amount", "two features are named 'amount'", 1, 16),
        ("SELECT LN(merchant || 'x') AS x", "'merchant || 'x'' is not supported", 1, 11),
        ("SELECT LN(country) AS x", "LN expects a number", 1, 11),
        ("SELECT amount FROM other", "belongs to dataset 'payments'", 1, 20),
        ("SELECT amount +", "not valid SQL", 1, 15),
        ("SELECT * FROM payments", "SELECT * is not supported", 1, 8),
    ],
)
def test_errors_name_the_construct_and_its_position(sql, message, line, column) -> None:
    with pytest.raises(FeatureSqlError) as caught:
        parse(sql)
    error = caught.value
    assert message in error.message
    assert (error.line, error.column) == (line, column), error
    assert f"(line {line}, column {column})" in str(error)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "empty"),
        ("SELECT 1 AS a; SELECT 2 AS b", "expected one SELECT statement, got 2"),
        ("UPDATE payments SET amount = 1", "only one SELECT"),
    ],
)
def test_errors_without_position(sql, message) -> None:
    with pytest.raises(FeatureSqlError, match=message):
        parse(sql)
