"""The monitoring API (metrics, verdict, drift, alerts) and `carrara deployments status`.

Rows are written straight into the monitoring tables with known values (the monitor process that
fills them is tested on its own), then every number the API derives is checked.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import log_loss, roc_auc_score
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.models import (
    Alert,
    Deployment,
    FeatureDrift,
    JoinedOutcome,
    ModelVersion,
    OutcomeStats,
    VariantMetrics,
)
from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS, SCORE_BINS
from carrara.monitoring import statistics
from carrara.monitoring.aggregates import Deltas
from carrara.monitoring.rollup import rebuild_hourly
from carrara.monitoring.views import ViewCache
from carrara.registry import service as registry
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import LiveApi, run_cli

API = "/api/v1/deployments"
BASE = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
LATENCY_BINS = len(LATENCY_EDGES_MS) + 1
END_TO_END_BINS = len(END_TO_END_EDGES_MS) + 1


def make_version(session: Session, model: str, version: int) -> ModelVersion:
    row = registry.register_version(session, model, version, None, f"models:/{model}/1", {})
    session.flush()
    return row


def histogram(size: int, counts: dict[int, int]) -> list[int]:
    values = [0] * size
    for index, count in counts.items():
        values[index] = count
    return values


def metrics_row(deployment: str, variant: str, at: datetime, **values: Any) -> VariantMetrics:
    """A variant_metrics row with zeros for everything not given (written straight into the
    table: `rebuild_hourly` then sums them into the hourly rollup, as the monitor's flush does)."""
    defaults: dict[str, Any] = {
        "shadow": False,
        "model_version": 1,
        "predictions": 0,
        "dead_letters": 0,
        "score_sum": 0.0,
        "score_histogram": [0] * SCORE_BINS,
        "latency_histogram": [0] * LATENCY_BINS,
        "outcomes": 0,
        "correct": 0,
        "log_loss_sum": 0.0,
        "squared_error_sum": 0.0,
        "absolute_error_sum": 0.0,
    }
    return VariantMetrics(
        deployment=deployment, variant=variant, bucket_start=at, **{**defaults, **values}
    )


def joined(
    deployment: str,
    variant: str,
    scores: np.ndarray,
    outcomes: np.ndarray,
    at: datetime,
    version: int = 1,
) -> list[JoinedOutcome]:
    return [
        JoinedOutcome(
            deployment=deployment,
            variant=variant,
            model_version=version,
            score=float(p),
            outcome=float(y),
            correct=bool((p >= 0.5) == (y == 1)),
            predicted_at=at + timedelta(seconds=i % 3000),
            observed_at=at + timedelta(hours=2),
        )
        for i, (p, y) in enumerate(zip(scores, outcomes, strict=True))
    ]


@pytest.fixture
def versions(db_session: Session) -> dict[str, ModelVersion]:
    return {
        "a": make_version(db_session, "mon-api-model", 1),
        "b": make_version(db_session, "mon-api-model", 2),
        "s": make_version(db_session, "mon-api-model", 3),
    }


def deployment_body(io_topics: tuple[str, str], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input_topic": io_topics[0],
        "output_topic": io_topics[1],
        "key_field": "user_id",
        "variants": [
            {"name": "a", "model": "mon-api-model", "version": 1, "weight": 60},
            {"name": "b", "model": "mon-api-model", "version": 2, "weight": 40},
            {"name": "s", "model": "mon-api-model", "version": 3, "shadow": True},
        ],
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def deployed(
    client: TestClient,
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    versions: dict[str, ModelVersion],
) -> str:
    response = client.put(f"{API}/mon", json=deployment_body(io_topics), headers=editor_headers)
    assert response.status_code == 201, response.text
    return "mon"


def _window(hours: float = 2, start: datetime = BASE) -> dict[str, str]:
    return {"from": start.isoformat(), "to": (start + timedelta(hours=hours)).isoformat()}


def _variant(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in report["variants"] if v["variant"] == name)


def test_metrics_series_rebucket_and_total_exactly(
    client: TestClient, viewer_headers: dict[str, str], deployed: str, db_session: Session
) -> None:
    # Variant a: two minutes in the 10:00 hour, one at 11:00, one outside the window.
    db_session.add_all(
        [
            metrics_row(
                deployed,
                "a",
                BASE + timedelta(minutes=5),
                predictions=10,
                score_sum=4.0,
                score_histogram=histogram(SCORE_BINS, {0: 4, 19: 6}),
                latency_histogram=histogram(LATENCY_BINS, {4: 10}),  # all in (10, 20] ms
                outcomes=8,
                correct=6,
                log_loss_sum=4.0,
            ),
            metrics_row(
                deployed,
                "a",
                BASE + timedelta(minutes=59),
                predictions=30,
                score_sum=15.0,
                score_histogram=histogram(SCORE_BINS, {0: 10, 10: 20}),
                latency_histogram=histogram(LATENCY_BINS, {2: 30}),  # all in (2, 5] ms
                outcomes=2,
                correct=2,
                log_loss_sum=0.2,
            ),
            metrics_row(
                deployed,
                "a",
                BASE + timedelta(minutes=60),
                predictions=5,
                score_sum=1.0,
                latency_histogram=histogram(LATENCY_BINS, {12: 5}),  # overflow: > 5000 ms
            ),
            metrics_row(deployed, "a", BASE + timedelta(hours=2), predictions=1000),
            metrics_row(deployed, "b", BASE + timedelta(minutes=7), predictions=3, model_version=2),
            metrics_row(
                deployed, "-", BASE + timedelta(minutes=5), dead_letters=4, model_version=None
            ),
            metrics_row(
                deployed, "-", BASE + timedelta(minutes=6), dead_letters=1, model_version=None
            ),
            metrics_row("another", "a", BASE + timedelta(minutes=5), predictions=99),
        ]
    )
    db_session.flush()
    rebuild_hourly(db_session, deployed)  # rows written here, not by the monitor's flush

    minute = client.get(f"{API}/{deployed}/metrics", params=_window(), headers=viewer_headers)
    assert minute.status_code == 200, minute.text
    report = minute.json()
    assert (report["from"], report["bucket"]) == ("2024-05-01T10:00:00Z", "minute")
    assert [v["variant"] for v in report["variants"]] == ["a", "b", "s", "-"]
    a = _variant(report, "a")
    assert [p["bucket_start"] for p in a["series"]] == [
        "2024-05-01T10:05:00Z",
        "2024-05-01T10:59:00Z",
        "2024-05-01T11:00:00Z",
    ]
    first = a["series"][0]
    assert (first["predictions"], first["mean_score"], first["outcomes"]) == (10, 0.4, 8)
    assert (first["accuracy"], first["log_loss"]) == (0.75, 0.5)
    assert (first["rmse"], first["mae"]) == (None, None)  # not a regression model
    assert first["p50_latency_ms"] == pytest.approx(15.0)  # 10 + 10 * 5/10
    assert first["p99_latency_ms"] == pytest.approx(19.9)
    assert a["series"][2]["p99_latency_ms"] == 5000.0  # the overflow bin reports the last edge

    hourly = client.get(
        f"{API}/{deployed}/metrics", params={**_window(), "bucket": "hour"}, headers=viewer_headers
    ).json()
    a = _variant(hourly, "a")
    assert [p["bucket_start"] for p in a["series"]] == [
        "2024-05-01T10:00:00Z",
        "2024-05-01T11:00:00Z",
    ]
    ten = a["series"][0]
    assert (ten["predictions"], ten["outcomes"], ten["mean_score"]) == (40, 10, 19.0 / 40)
    assert ten["score_histogram"] == histogram(SCORE_BINS, {0: 14, 10: 20, 19: 6})
    assert ten["latency_histogram"] == histogram(LATENCY_BINS, {2: 30, 4: 10})
    assert ten["accuracy"] == pytest.approx(0.8)
    assert ten["log_loss"] == pytest.approx(0.42)
    # 40 values: 30 in (2, 5], 10 in (10, 20]. p50: rank 20 -> 2 + 3 * 20/30; p99: rank 39.6.
    assert ten["p50_latency_ms"] == pytest.approx(4.0)
    assert ten["p99_latency_ms"] == pytest.approx(19.6)

    totals = a["totals"]
    assert (totals["predictions"], totals["outcomes"], totals["dead_letters"]) == (45, 10, 0)
    assert totals["latency_histogram"] == histogram(LATENCY_BINS, {2: 30, 4: 10, 12: 5})
    assert totals["mean_score"] == pytest.approx(20.0 / 45)
    b = _variant(hourly, "b")
    assert (b["totals"]["predictions"], b["model_version"], b["shadow"]) == (3, 2, False)
    s = _variant(hourly, "s")  # in the spec, no data yet
    assert (s["series"], s["totals"]["predictions"], s["shadow"]) == ([], 0, True)
    assert s["totals"]["p99_latency_ms"] is None
    assert s["totals"]["mean_score"] is None
    dead = _variant(hourly, "-")
    assert (dead["totals"]["dead_letters"], dead["model_version"]) == (5, None)
    assert dead["series"][0]["dead_letters"] == 5

    daily = client.get(
        f"{API}/{deployed}/metrics", params={**_window(), "bucket": "day"}, headers=viewer_headers
    ).json()
    a = _variant(daily, "a")
    assert [(p["bucket_start"], p["predictions"]) for p in a["series"]] == [
        ("2024-05-01T00:00:00Z", 45)
    ]


def test_end_to_end_latency_is_reported_next_to_the_in_process_latency(
    client: TestClient, viewer_headers: dict[str, str], deployed: str, db_session: Session
) -> None:
    e2e_40 = END_TO_END_EDGES_MS.index(40)  # the (20, 40] ms bin
    db_session.add_all(
        [
            # 10 events 5-10 ms end to end, scored in 1-2 ms.
            metrics_row(
                deployed,
                "a",
                BASE + timedelta(minutes=1),
                predictions=10,
                latency_histogram=histogram(LATENCY_BINS, {1: 10}),
                end_to_end_histogram=histogram(END_TO_END_BINS, {3: 10}),
            ),
            # A row of a monitor that did not count end to end yet: the column's default ([]).
            metrics_row(
                deployed,
                "a",
                BASE + timedelta(minutes=3),
                predictions=4,
                latency_histogram=histogram(LATENCY_BINS, {1: 4}),
            ),
            metrics_row(
                deployed,
                "b",
                BASE + timedelta(minutes=1),
                predictions=3,
                latency_histogram=histogram(LATENCY_BINS, {0: 3}),
            ),
        ]
    )
    db_session.flush()
    rebuild_hourly(db_session, deployed)  # rows written here, not by the monitor's flush
    # 10 more events of `a`, 20-40 ms end to end, through the monitor's own flush (twice: adds).
    for _ in range(2):
        deltas = Deltas()
        d = deltas.variant(deployed, "a", BASE + timedelta(minutes=2))
        d.predictions = 5
        d.latency_histogram[1] = 5
        d.end_to_end_histogram[e2e_40] = 5
        deltas.flush(db_session)
    stored = db_session.scalars(
        select(VariantMetrics.end_to_end_histogram).where(
            VariantMetrics.deployment == deployed,
            VariantMetrics.bucket_start == BASE + timedelta(minutes=3),
        )
    ).one()
    assert stored == []  # old rows: no data, not zeros

    response = client.get(f"{API}/{deployed}/metrics", params=_window(), headers=viewer_headers)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["end_to_end_edges_ms"] == [float(e) for e in END_TO_END_EDGES_MS]
    assert report["latency_edges_ms"] == [float(e) for e in LATENCY_EDGES_MS]
    a = _variant(report, "a")
    one, two, three = a["series"]
    assert one["end_to_end_histogram"] == histogram(END_TO_END_BINS, {3: 10})
    assert one["p50_end_to_end_ms"] == pytest.approx(7.5)  # 5 + 5 * 5/10
    assert one["p99_end_to_end_ms"] == pytest.approx(9.95)
    assert one["p50_latency_ms"] == pytest.approx(1.5)  # in-process, apart
    assert two["end_to_end_histogram"] == histogram(END_TO_END_BINS, {e2e_40: 10})
    assert two["p50_end_to_end_ms"] == pytest.approx(30.0)  # 20 + 20 * 5/10
    assert two["p99_end_to_end_ms"] == pytest.approx(39.8)
    assert (three["predictions"], three["p50_end_to_end_ms"], three["p99_end_to_end_ms"]) == (
        4,
        None,
        None,
    )
    assert three["end_to_end_histogram"] == [0] * END_TO_END_BINS
    assert three["p50_latency_ms"] == pytest.approx(1.5)
    totals = a["totals"]
    assert totals["predictions"] == 24
    assert totals["end_to_end_histogram"] == histogram(END_TO_END_BINS, {3: 10, e2e_40: 10})
    # 20 measured events: p50 at rank 10 is the top of (5, 10]; p99 at rank 19.8 in (20, 40].
    assert totals["p50_end_to_end_ms"] == pytest.approx(10.0)
    assert totals["p99_end_to_end_ms"] == pytest.approx(39.6)
    assert totals["p50_latency_ms"] == pytest.approx(1.5)
    b = _variant(report, "b")
    assert b["totals"]["p50_latency_ms"] == pytest.approx(0.5)
    assert (b["totals"]["p50_end_to_end_ms"], b["totals"]["p99_end_to_end_ms"]) == (None, None)

    hourly = client.get(
        f"{API}/{deployed}/metrics", params={**_window(), "bucket": "hour"}, headers=viewer_headers
    ).json()
    (ten,) = _variant(hourly, "a")["series"]
    assert ten["p50_end_to_end_ms"] == pytest.approx(10.0)
    assert ten["p99_end_to_end_ms"] == pytest.approx(39.6)

    schema = client.get("/openapi.json").json()["components"]["schemas"]
    totals_schema = schema["VariantTotals"]["properties"]
    assert "end-to-end" in totals_schema["p50_end_to_end_ms"]["description"]
    assert "in-process" in totals_schema["p50_latency_ms"]["description"]


def test_metrics_live_auc_matches_sklearn_and_outcome_stats_add_up(
    client: TestClient, viewer_headers: dict[str, str], deployed: str, db_session: Session
) -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500).astype(float)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 500), 0, 1)
    db_session.add_all(joined(deployed, "a", p, y, BASE))
    # Outside the window, with anti-correlated scores: would drag the AUC down if counted.
    db_session.add_all(joined(deployed, "a", 1 - y, y, BASE - timedelta(hours=3)))
    db_session.add_all(joined(deployed, "b", np.full(20, 0.7), np.ones(20), BASE, version=2))
    db_session.add_all(
        [
            OutcomeStats(
                deployment=deployed,
                bucket_start=BASE + timedelta(minutes=m),
                matched=m,
                late=1,
                unmatched=2,
                invalid=3,
                expired_predictions=4,
            )
            for m in (1, 2, 3)
        ]
        + [
            OutcomeStats(
                deployment=deployed,
                bucket_start=BASE + timedelta(hours=5),
                matched=100,
                late=100,
                unmatched=100,
                invalid=100,
                expired_predictions=100,
            )
        ]
    )
    db_session.flush()
    report = client.get(
        f"{API}/{deployed}/metrics", params=_window(), headers=viewer_headers
    ).json()
    assert abs(_variant(report, "a")["totals"]["auc"] - roc_auc_score(y, p)) < 1e-12
    assert _variant(report, "b")["totals"]["auc"] is None  # one class only
    assert _variant(report, "s")["totals"]["auc"] is None
    assert report["outcome_stats"] == {
        "matched": 6,
        "late": 3,
        "unmatched": 6,
        "invalid": 9,
        "expired_predictions": 12,
    }


def test_regression_metrics_are_rmse_and_mae(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    db_session: Session,
) -> None:
    row = make_version(db_session, "mon-api-regressor", 1)
    row.feature_profile = {"task": "regression", "features": {}}
    spec = deployment_body(
        io_topics,
        variants=[{"name": "r", "model": "mon-api-regressor", "version": 1, "weight": 100}],
    )
    assert client.put(f"{API}/reg", json=spec, headers=editor_headers).status_code == 201
    db_session.add(
        metrics_row(
            "reg",
            "r",
            BASE,
            predictions=4,
            outcomes=4,
            squared_error_sum=9.0,
            absolute_error_sum=5.0,
        )
    )
    db_session.add_all(joined("reg", "r", np.array([1.0, 2.5]), np.array([1.5, 2.0]), BASE))
    db_session.flush()
    rebuild_hourly(db_session, "reg")  # rows written here, not by the monitor's flush
    report = client.get(f"{API}/reg/metrics", params=_window(), headers=viewer_headers).json()
    assert report["task"] == "regression"
    totals = _variant(report, "r")["totals"]
    assert (totals["rmse"], totals["mae"]) == (1.5, 1.25)
    assert (totals["accuracy"], totals["log_loss"], totals["auc"]) == (None, None, None)


def test_metrics_default_window_is_the_last_hour(
    client: TestClient, viewer_headers: dict[str, str], deployed: str, db_session: Session
) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    db_session.add_all(
        [
            metrics_row(deployed, "a", now - timedelta(minutes=10), predictions=7),
            metrics_row(deployed, "a", now - timedelta(hours=2), predictions=100),
        ]
    )
    db_session.flush()
    rebuild_hourly(db_session, deployed)  # rows written here, not by the monitor's flush
    report = client.get(f"{API}/{deployed}/metrics", headers=viewer_headers).json()
    start = datetime.fromisoformat(report["from"])
    end = datetime.fromisoformat(report["to"])
    assert end - start == timedelta(hours=1)
    assert abs((end - datetime.now(UTC)).total_seconds()) < 60
    assert _variant(report, "a")["totals"]["predictions"] == 7


def test_metrics_and_verdicts_are_remembered_briefly_and_per_revision(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    deployed: str,
    db_session: Session,
) -> None:
    url = f"{API}/{deployed}/metrics"
    before = client.get(url, headers=viewer_headers).json()
    assert _variant(before, "a")["totals"]["predictions"] == 0
    verdict_before = client.get(f"{API}/{deployed}/verdict", headers=viewer_headers).json()
    # The monitor counts a minute: within CARRARA_MONITORING_CACHE_S the same answer is served.
    deltas = Deltas()
    deltas.variant(deployed, "a", datetime.now(UTC) - timedelta(minutes=2)).predictions = 7
    deltas.flush(db_session)
    assert client.get(url, headers=viewer_headers).json() == before
    # A new revision is seen at once (the answer is remembered per revision).
    spec = deployment_body(io_topics, monitoring={"champion": "b"})
    assert client.put(f"{API}/{deployed}", json=spec, headers=editor_headers).status_code == 201
    after = client.get(url, headers=viewer_headers).json()
    assert _variant(after, "a")["totals"]["predictions"] == 7
    verdict = client.get(f"{API}/{deployed}/verdict", headers=viewer_headers).json()
    assert (verdict_before["champion"], verdict["champion"]) == ("a", "b")


def test_the_view_cache_keeps_answers_for_its_ttl_only() -> None:
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    cache = ViewCache(ttl_s=60)
    assert [cache.get_or_compute("k", compute) for _ in range(3)] == [1, 1, 1]
    assert cache.get_or_compute("other", compute) == 2
    brief = ViewCache(ttl_s=1e-9)  # every answer is older than the TTL when asked again
    assert [brief.get_or_compute("k", compute) for _ in range(2)] == [3, 4]
    off = ViewCache(ttl_s=0)
    assert [off.get_or_compute("k", compute) for _ in range(2)] == [5, 6]
    full = ViewCache(ttl_s=60, max_entries=2)
    for key in ("a", "b", "c"):
        full.get_or_compute(key, compute)
    assert full.get_or_compute("a", compute) == 10  # started over when full: "a" was forgotten


def test_the_view_cache_computes_a_key_once_while_others_wait() -> None:
    cache = ViewCache(ttl_s=60)
    release = threading.Event()
    calls: list[int] = []

    def slow() -> str:
        calls.append(1)
        assert release.wait(timeout=30), "never released"
        return "answer"

    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(cache.get_or_compute, "k", slow)
        deadline = time.monotonic() + 30
        while not calls:  # the first caller is computing
            assert time.monotonic() < deadline, "the first caller never started computing"
            time.sleep(0.01)
        others = [pool.submit(cache.get_or_compute, "k", slow) for _ in range(3)]
        assert not any(f.done() for f in others)  # waiting for the first caller's answer
        release.set()
        assert [f.result(timeout=30) for f in [first, *others]] == ["answer"] * 4
    assert len(calls) == 1

    def failing() -> str:
        raise RuntimeError("no answer")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("bad", failing)
    assert cache.get_or_compute("bad", lambda: "now") == "now"  # errors are not kept


@pytest.mark.usefixtures("deployed")
def test_metrics_windows_are_validated(client: TestClient, viewer_headers: dict[str, str]) -> None:
    url = f"{API}/mon/metrics"
    too_many = client.get(url, params=_window(hours=24 * 7), headers=viewer_headers)
    assert too_many.status_code == 422
    assert "10,080 minute buckets, more than 10,000" in too_many.json()["detail"]
    hourly = client.get(
        url, params={**_window(hours=24 * 7), "bucket": "hour"}, headers=viewer_headers
    )
    assert hourly.status_code == 200
    exactly = client.get(url, params=_window(hours=10_000 / 60), headers=viewer_headers)
    assert exactly.status_code == 200, exactly.text
    backwards = client.get(
        url, params={"from": BASE.isoformat(), "to": BASE.isoformat()}, headers=viewer_headers
    )
    assert backwards.status_code == 422
    assert "must be before" in backwards.json()["detail"]
    naive = client.get(
        url,
        params={"from": "2024-05-01T10:00:00", "to": "2024-05-01T11:00:00"},
        headers=viewer_headers,
    )
    assert naive.json()["from"] == "2024-05-01T10:00:00Z"  # read as UTC
    assert client.get(url, params={"bucket": "week"}, headers=viewer_headers).status_code == 422
    early = client.get(url, params={"to": "0001-01-01T00:10:00Z"}, headers=viewer_headers)
    assert early.status_code == 422
    missing = client.get(f"{API}/ghost/metrics", headers=viewer_headers)
    assert missing.status_code == 404
    assert "ghost" in missing.json()["detail"]
    assert client.get(url).status_code == 401


def _revision_made_at(session: Session, name: str, at: datetime) -> None:
    _, revision = deployments.get_deployment(session, name)
    revision.created_at = at
    session.flush()


def _good_and_bad(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    y_good = rng.integers(0, 2, n).astype(float)
    good = np.where(y_good == 1, rng.beta(8, 2, n), rng.beta(2, 8, n))
    y_bad = rng.integers(0, 2, n).astype(float)
    bad = rng.uniform(0.05, 0.95, n)
    return y_good, good, y_bad, bad


def test_verdict_picks_the_better_variant(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    deployed: str,
    db_session: Session,
) -> None:
    rng = np.random.default_rng(11)
    y_good, good, y_bad, bad = _good_and_bad(rng, 1500)
    _revision_made_at(db_session, deployed, BASE)
    db_session.add_all(joined(deployed, "a", good, y_good, BASE, version=1))
    db_session.add_all(joined(deployed, "b", bad, y_bad, BASE, version=2))
    # Neither an older version of b nor predictions made before the revision are compared.
    db_session.add_all(joined(deployed, "b", y_good, y_good, BASE, version=7))
    db_session.add_all(joined(deployed, "a", 1 - y_good, y_good, BASE - timedelta(hours=2)))
    db_session.add_all(joined(deployed, "s", good[:10], y_good[:10], BASE, version=3))
    db_session.flush()

    response = client.get(f"{API}/{deployed}/verdict", headers=viewer_headers)
    assert response.status_code == 200, response.text
    verdict = response.json()
    assert verdict["since"] == "2024-05-01T10:00:00Z"
    assert (verdict["metric"], verdict["champion"], verdict["higher_is_better"]) == (
        "log_loss",
        "a",
        False,
    )
    b, s = verdict["comparisons"]
    assert (b["challenger"], b["n_champion"], b["n_challenger"]) == ("b", 1500, 1500)
    assert b["mean_champion"] == pytest.approx(log_loss(y_good, good), abs=1e-9)
    assert b["mean_challenger"] == pytest.approx(log_loss(y_bad, bad), abs=1e-9)
    assert (b["better"], b["significant"]) == ("champion", True)
    assert b["ci_low"] > 0  # the challenger's loss is higher
    assert b["p_value"] < 0.05
    assert b["verdict"].startswith("champion better, ")
    assert "n = 3,000" in b["verdict"]
    assert s["challenger"] == "s"
    assert (s["n_challenger"], s["significant"], s["better"], s["p_value"]) == (
        10,
        False,
        None,
        None,
    )
    assert s["verdict"].startswith("not enough outcomes yet")

    # b as the configured champion, judged on accuracy: now a is the challenger that wins.
    spec = deployment_body(io_topics, monitoring={"champion": "b", "metric": "accuracy"})
    assert client.put(f"{API}/{deployed}", json=spec, headers=editor_headers).status_code == 201
    _revision_made_at(db_session, deployed, BASE)  # as if made before the outcomes above
    verdict = client.get(f"{API}/{deployed}/verdict", headers=viewer_headers).json()
    assert (verdict["metric"], verdict["champion"], verdict["higher_is_better"]) == (
        "accuracy",
        "b",
        True,
    )
    a = verdict["comparisons"][0]
    assert a["challenger"] == "a"
    accuracy_good = float(np.mean((good >= 0.5) == (y_good == 1)))
    assert a["mean_challenger"] == pytest.approx(accuracy_good)
    assert (a["better"], a["significant"]) == ("challenger", True)
    assert a["verdict"].startswith("challenger better, ")


def test_verdict_without_outcomes_says_so(
    client: TestClient, viewer_headers: dict[str, str], deployed: str
) -> None:
    verdict = client.get(f"{API}/{deployed}/verdict", headers=viewer_headers).json()
    assert [c["challenger"] for c in verdict["comparisons"]] == ["b", "s"]
    for comparison in verdict["comparisons"]:
        assert comparison["verdict"].startswith("not enough outcomes yet")
        assert (comparison["n_champion"], comparison["mean_champion"]) == (0, None)
    assert client.get(f"{API}/ghost/verdict", headers=viewer_headers).status_code == 404


def test_drift_flags_a_shifted_feature(
    client: TestClient,
    viewer_headers: dict[str, str],
    deployed: str,
    versions: dict[str, ModelVersion],
    db_session: Session,
) -> None:
    rng = np.random.default_rng(3)
    amount = rng.normal(0, 1, 5000)
    country = rng.choice(["fr", "de", "it", "es"], 5000, p=[0.4, 0.3, 0.2, 0.1])
    profiles = {
        "amount": statistics.build_profile(amount, "numeric"),
        "country": statistics.build_profile(list(country), "category"),
        "quiet": statistics.build_profile(amount, "numeric"),
    }
    champion = versions["a"]
    champion.feature_profile = {"task": "binary", "features": profiles}
    db_session.flush()
    shifted = rng.normal(1.5, 1, 2000)
    same = list(rng.choice(["fr", "de", "it", "es"], 2000, p=[0.4, 0.3, 0.2, 0.1]))
    halves = [
        (BASE + timedelta(minutes=1), shifted[:1000], same[:1000], 3),
        (BASE + timedelta(minutes=2), shifted[1000:], same[1000:], 4),
    ]
    for at, values, categories, missing in halves:
        db_session.add_all(
            [
                FeatureDrift(
                    deployment=deployed,
                    feature="amount",
                    bucket_start=at,
                    model_version_id=champion.id,
                    counts=statistics.bin_counts(profiles["amount"], values),
                    missing=missing,
                ),
                FeatureDrift(
                    deployment=deployed,
                    feature="country",
                    bucket_start=at,
                    model_version_id=champion.id,
                    counts=statistics.bin_counts(profiles["country"], categories),
                    missing=0,
                ),
            ]
        )
    # Counts of another version's profile and counts outside the window are left out.
    db_session.add_all(
        [
            FeatureDrift(
                deployment=deployed,
                feature="country",
                bucket_start=BASE + timedelta(minutes=3),
                model_version_id=versions["b"].id,
                counts=[0, 0, 0, 0, 5000],
                missing=0,
            ),
            FeatureDrift(
                deployment=deployed,
                feature="country",
                bucket_start=BASE - timedelta(minutes=1),
                model_version_id=champion.id,
                counts=[0, 0, 0, 0, 5000],
                missing=0,
            ),
        ]
    )
    db_session.flush()

    response = client.get(f"{API}/{deployed}/drift", params=_window(1), headers=viewer_headers)
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["model"], report["model_version"], report["threshold"]) == (
        "mon-api-model",
        1,
        0.2,
    )
    assert report["note"] is None
    by_name = {f["feature"]: f for f in report["features"]}
    assert list(by_name) == ["amount", "country", "quiet"]
    amount_counts = statistics.bin_counts(profiles["amount"], shifted)
    drifted = by_name["amount"]
    assert (drifted["kind"], drifted["live_count"], drifted["missing"]) == ("numeric", 2000, 7)
    assert drifted["psi"] == pytest.approx(
        statistics.psi(profiles["amount"]["shares"], amount_counts)
    )
    expected_ks = np.max(
        np.abs(
            np.cumsum(profiles["amount"]["shares"])
            - np.cumsum(np.asarray(amount_counts) / sum(amount_counts))
        )
    )
    assert drifted["ks"] == pytest.approx(expected_ks)
    assert drifted["psi"] > 0.2
    assert drifted["drifted"] is True
    stable = by_name["country"]
    assert (stable["kind"], stable["live_count"], stable["ks"]) == ("category", 2000, None)
    assert stable["psi"] < 0.05
    assert stable["drifted"] is False
    assert by_name["quiet"] == {
        "feature": "quiet",
        "kind": "numeric",
        "psi": None,
        "ks": None,
        "live_count": 0,
        "missing": 0,
        "drifted": False,
    }


def test_drift_without_a_profile_says_why(
    client: TestClient, viewer_headers: dict[str, str], deployed: str
) -> None:
    response = client.get(f"{API}/{deployed}/drift", headers=viewer_headers)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["features"] == []
    assert "has no training profile" in report["note"]
    assert "mon-api-model v1" in report["note"]


def test_alerts_are_listed_newest_first_with_filters(
    client: TestClient, viewer_headers: dict[str, str], db_session: Session
) -> None:
    deployment = f"alerting-{uuid.uuid4().hex[:6]}"
    rows = [
        Alert(
            deployment=deployment,
            kind="drift" if i % 2 == 0 else "auto_rollback",
            severity="warning",
            message=f"alert {i}",
            details={"i": i},
            fingerprint=f"{deployment}-{i}",
            at=BASE + timedelta(minutes=i),
        )
        for i in range(5)
    ]
    rows.append(
        Alert(
            deployment=f"{deployment}-other",
            kind="drift",
            severity="info",
            message="elsewhere",
            details={},
            fingerprint="x",
            at=BASE,
        )
    )
    db_session.add_all(rows)
    db_session.flush()
    url = "/api/v1/alerts"
    first = client.get(url, params={"deployment": deployment, "limit": 2}, headers=viewer_headers)
    assert first.status_code == 200, first.text
    assert [a["message"] for a in first.json()["items"]] == ["alert 4", "alert 3"]
    assert first.json()["items"][0]["details"] == {"i": 4}
    rest = client.get(
        url,
        params={"deployment": deployment, "limit": 2, "cursor": first.json()["next_cursor"]},
        headers=viewer_headers,
    ).json()
    assert [a["message"] for a in rest["items"]] == ["alert 2", "alert 1"]
    drift = client.get(
        url, params={"deployment": deployment, "kind": "drift"}, headers=viewer_headers
    )
    assert [a["message"] for a in drift.json()["items"]] == ["alert 4", "alert 2", "alert 0"]
    since = client.get(
        url,
        params={"deployment": deployment, "since": (BASE + timedelta(minutes=3)).isoformat()},
        headers=viewer_headers,
    )
    assert [a["message"] for a in since.json()["items"]] == ["alert 4", "alert 3"]
    assert (
        client.get(url, params={"deployment": "Bad Name"}, headers=viewer_headers).status_code
        == 422
    )
    assert client.get(url).status_code == 401


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


def test_cli_status_shows_rollout_metrics_verdict_drift_and_alerts(
    live_api: LiveApi, engine: Engine, stack_settings: Settings
) -> None:
    suffix = uuid.uuid4().hex[:8]
    name = f"status-{suffix}"
    model = f"status-model-{suffix}"
    io_topics = (f"status-in-{suffix}", f"status-out-{suffix}")
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    for topic in io_topics:
        admin.create_topic(topic, 1)
    try:
        rng = np.random.default_rng(5)
        amount = rng.normal(0, 1, 3000)
        profile = {"amount": statistics.build_profile(amount, "numeric")}
        with Session(engine) as session, session.begin():
            champion = registry.register_version(session, model, 1, None, "models:/x/1", {})
            registry.register_version(session, model, 2, None, "models:/x/2", {})
            champion.feature_profile = {"task": "binary", "features": profile}
            session.flush()
            champion_id = champion.id
        applied = httpx.put(
            f"{live_api.url}/api/v1/deployments/{name}",
            json={
                "input_topic": io_topics[0],
                "output_topic": io_topics[1],
                "key_field": "user_id",
                "variants": [
                    {"name": "a", "model": model, "version": 1, "weight": 50},
                    {"name": "b", "model": model, "version": 2, "weight": 50},
                ],
                "monitoring": {"champion": "a"},
            },
            headers={"Authorization": f"Bearer {live_api.admin_token}"},
            timeout=30,
        )
        assert applied.status_code == 201, applied.text
        # The API commits right after sending its response: wait until the revision is visible.
        deadline = time.monotonic() + 10
        while True:
            with Session(engine) as session:
                if session.scalar(select(Deployment.id).where(Deployment.name == name)):
                    break
            assert time.monotonic() < deadline, "the applied deployment never became visible"
            time.sleep(0.05)

        now = datetime.now(UTC).replace(second=0, microsecond=0)
        y_good, good, y_bad, bad = _good_and_bad(rng, 1200)
        with Session(engine) as session, session.begin():
            # The outcomes below are of predictions made after the revision.
            _revision_made_at(session, name, now - timedelta(hours=1))
            session.add_all(
                [
                    metrics_row(
                        name,
                        "a",
                        now - timedelta(minutes=5),
                        predictions=1234,
                        latency_histogram=histogram(LATENCY_BINS, {3: 100}),
                        outcomes=1200,
                        correct=900,
                    ),
                    metrics_row(
                        name, "b", now - timedelta(minutes=5), predictions=4321, model_version=2
                    ),
                    metrics_row(
                        name, "-", now - timedelta(minutes=5), dead_letters=17, model_version=None
                    ),
                ]
            )
            session.add_all(joined(name, "a", good, y_good, now - timedelta(minutes=50)))
            session.add_all(joined(name, "b", bad, y_bad, now - timedelta(minutes=50), 2))
            session.add(
                FeatureDrift(
                    deployment=name,
                    feature="amount",
                    bucket_start=now - timedelta(minutes=3),
                    model_version_id=champion_id,
                    counts=statistics.bin_counts(profile["amount"], rng.normal(3, 1, 500)),
                    missing=0,
                )
            )
            session.add_all(
                Alert(
                    deployment=name,
                    kind="drift",
                    severity="warning",
                    message=f"feature amount drifted [{i}]",
                    details={},
                    fingerprint=f"{name}-{i}",
                )
                for i in range(7)
            )

        status = _json(run_cli(live_api, "deployments", "status", name, "--json"))
        assert status["deployment"]["name"] == name
        assert status["deployment"]["rollout"]["summary"] == "0/0 scorers on revision 1"
        last_hour = {v["variant"]: v for v in status["last_hour"]["variants"]}
        assert last_hour["a"]["totals"]["predictions"] == 1234
        assert last_hour["a"]["totals"]["accuracy"] == 0.75
        assert "series" not in last_hour["a"]
        assert last_hour["b"]["totals"]["predictions"] == 4321
        assert last_hour["-"]["totals"]["dead_letters"] == 17
        assert abs(last_hour["a"]["totals"]["auc"] - roc_auc_score(y_good, good)) < 1e-9
        (comparison,) = status["verdict"]["comparisons"]
        assert (comparison["challenger"], comparison["better"]) == ("b", "champion")
        assert [f["feature"] for f in status["drift"]["features"] if f["drifted"]] == ["amount"]
        assert len(status["alerts"]) == 5
        assert status["alerts"][0]["message"] == "feature amount drifted [6]"

        table = run_cli(live_api, "deployments", "status", name)
        assert table.returncode == 0, table.stderr
        out = table.stdout
        assert f"{name} running revision 1" in out
        assert "1,234" in out
        assert "4,321" in out
        assert "0.75" in out
        assert "b: champion better, " in out
        assert "amount: PSI" in out
        assert "feature amount drifted [6]" in out  # not eaten as markup
        assert "feature amount drifted [1]" not in out  # only the 5 newest

        missing = run_cli(live_api, "deployments", "status", f"ghost-{suffix}")
        assert missing.returncode == 2
        assert "does not exist" in missing.stderr
    finally:
        admin.delete_topics(list(io_topics))


def test_latency_quantile_math_is_the_documented_interpolation() -> None:
    # Guards the hand-computed expectations above against a change of convention.
    counts = histogram(LATENCY_BINS, {2: 30, 4: 10})
    assert statistics.quantile_from_histogram(counts, LATENCY_EDGES_MS, 0.5) == pytest.approx(4.0)
    assert math.isclose(
        statistics.quantile_from_histogram(counts, LATENCY_EDGES_MS, 0.99) or 0, 19.6
    )
