"""Monitoring end to end: API -> outbox -> scorer -> predictions -> monitor -> Postgres -> API.

A deployment with a good and a deliberately worse variant, delayed outcomes, a monitor killed
with SIGKILL mid-stream and restarted, then shifted inputs: live metrics must match the same
numbers computed offline from the output topic, the verdict must name the better variant, the
policy must roll the worse one back, and drift must raise an alert.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Producer
from sklearn.metrics import roc_auc_score
from sqlalchemy import create_engine, text

from carrara.monitoring.statistics import build_profile
from carrara.settings import Settings
from carrara.streams.client_config import producer_config
from carrara.streams.event_codec import decode_events, fit_feature_spec
from carrara.streams.prediction_record import decode_prediction
from carrara.streams.topics import TopicAdmin
from carrara.training.algorithms import validate_params
from carrara.training.mlflow_logging import Lineage, log_and_register
from carrara.training.onnx_export import export_onnx
from carrara.training.trainers import train
from tests.integration.conftest import ROOT, RUN_ID, LiveApi

SCHEMA = {
    "key_field": "card_id",
    "label_field": "fraud",
    "task": "binary",
    "features": [
        {"name": "amount", "type": "float"},
        {"name": "velocity", "type": "float"},
        {"name": "merchant", "type": "category"},
    ],
}
BIN = str(Path(sys.executable).parent)


def _event(i: int, shift: float = 1.0) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    amount = float(rng.lognormal(3, 0.8)) * shift
    velocity = float(rng.poisson(2))
    merchant = ["grocery", "online", "travel"][i % 3]
    risk = 0.05 * amount / shift + 0.9 * velocity + (1.5 if merchant == "online" else 0) - 4.5
    fraud = int(rng.random() < 1 / (1 + np.exp(-risk)))
    return {
        "card_id": f"m-{RUN_ID}-{i}",
        "amount": amount,
        "velocity": velocity,
        "merchant": merchant,
        "fraud": fraud,
    }


def _register(settings: Settings, name: str, shuffle: bool) -> tuple[int, dict[str, Any]]:
    events = [orjson.dumps(_event(1_000_000 + i)) for i in range(3000)]
    decoded = decode_events(SCHEMA, [(events, [0] * 3000, list(range(3000)))])
    spec = fit_feature_spec(decoded)
    x, y = spec.transform(decoded), spec.encode_labels(decoded)
    if shuffle:  # the deliberately worse model learns from scrambled labels
        y = np.random.default_rng(0).permutation(y)
    params = validate_params("logistic_regression", "binary", {})
    model = train("logistic_regression", "binary", params, x, y)
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage(
            "monitor-test", 1, "t", [{"partition": 0, "start": 0, "end": 3000}], 3000, 0
        ),
        algorithm="logistic_regression",
        params=params,
        metrics={},
        trained=model,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=x[:200],
        holdout_y=y[:200],
        onnx=export_onnx(model, x[:200]),
    )
    profile = {
        "task": "binary",
        "label_classes": list(spec.label_classes or []),
        "features": {
            "amount": build_profile(decoded.numeric[:, 0], "numeric"),
            "velocity": build_profile(decoded.numeric[:, 1], "numeric"),
            "merchant": build_profile(decoded.categories["merchant"], "category"),
        },
    }
    return logged.version, profile


def _process(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = ROOT / ".carrara" / "logs" / f"test-{name}-{RUN_ID}.log"
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _produce(settings: Settings, topic: str, records: list[tuple[str, dict[str, Any]]]) -> None:
    producer = Producer(producer_config(settings.kafka_bootstrap))
    for key, value in records:
        producer.produce(topic, key=key, value=orjson.dumps(value))
        producer.poll(0)
    assert producer.flush(30) == 0


def _read_predictions(settings: Settings, topic: str, deployment: str, expected: int) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    found: list[Any] = []
    deadline = time.monotonic() + 120
    while len(found) < expected and time.monotonic() < deadline:
        for m in consumer.consume(1000, timeout=0.5):
            if m.error() is None:
                p = decode_prediction(m.value())
                if p.deployment == deployment:
                    found.append(p)
    consumer.close()
    return found


@pytest.fixture
def topics(stack_settings: Settings) -> Iterator[dict[str, str]]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    names = {
        k: f"test-{RUN_ID}-mon-{k}-{uuid.uuid4().hex[:6]}" for k in ("input", "output", "outcomes")
    }
    for name in names.values():
        admin.create_topic(name, partitions=3)
    yield names
    admin.delete_topics([*names.values(), f"{names['input']}.dead-letters"])


def test_live_metrics_verdict_rollback_drift_and_a_killed_monitor(
    live_api: LiveApi, stack_settings: Settings, test_database_url: str, topics: dict[str, str]
) -> None:
    headers = {"Authorization": f"Bearer {live_api.admin_token}"}

    def api(method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{live_api.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )

    good_name, bad_name = f"mon-good-{RUN_ID}", f"mon-bad-{RUN_ID}"
    good_version, profile = _register(stack_settings, good_name, shuffle=False)
    bad_version, _ = _register(stack_settings, bad_name, shuffle=True)
    for name, version in ((good_name, good_version), (bad_name, bad_version)):
        response = api("POST", f"/models/{name}/versions", json={"version": version})
        assert response.status_code == 201, response.text
    engine = create_engine(test_database_url)
    with engine.begin() as conn:  # what a training run stores with its version
        conn.execute(
            text(
                "UPDATE model_versions SET feature_profile = CAST(:p AS jsonb) WHERE id = "
                "(SELECT v.id FROM model_versions v JOIN registered_models m "
                "ON m.id = v.registered_model_id WHERE m.name = :n AND v.version = :v)"
            ),
            {"p": orjson.dumps(profile).decode(), "n": good_name, "v": good_version},
        )
    engine.dispose()

    pool = f"mon-pool-{uuid.uuid4().hex[:6]}"
    deployment = f"mon-{uuid.uuid4().hex[:8]}"
    body = {
        "input_topic": topics["input"],
        "output_topic": topics["output"],
        "key_field": "card_id",
        "pool": pool,
        "variants": [
            {"name": "a", "model": good_name, "version": good_version, "weight": 50},
            {"name": "b", "model": bad_name, "version": bad_version, "weight": 50},
        ],
        "monitoring": {
            "outcomes_topic": topics["outcomes"],
            "outcome_field": "fraud",
            "join_by": "key",
            "window_s": 3600,
            "metric": "log_loss",
            "champion": "a",
        },
        "policy": {"auto_rollback": True, "min_outcomes": 100},
    }
    response = api("PUT", f"/deployments/{deployment}", json=body)
    assert response.status_code == 201, response.text
    first_revision = response.json()["revision"]

    env = {"CARRARA_DATABASE_URL": test_database_url}
    scorer = _process(
        "mon-scorer",
        [
            f"{BIN}/carrara-scorer",
            "--pool",
            pool,
            "--instance-id",
            f"mon-{RUN_ID}",
            "--metrics-port",
            "0",
        ],
        env,
    )
    monitor = _process("monitor", [f"{BIN}/carrara-monitor", "--metrics-port", "0"], env)
    try:
        n = 4000
        events = [_event(i) for i in range(n)]
        _produce(
            stack_settings,
            topics["input"],
            [(e["card_id"], {k: v for k, v in e.items() if k != "fraud"}) for e in events],
        )
        predictions = _read_predictions(stack_settings, topics["output"], deployment, n)
        assert len(predictions) == n

        # Outcomes arrive later, in two halves, with the monitor killed between them.
        outcomes = [(e["card_id"], {"card_id": e["card_id"], "fraud": e["fraud"]}) for e in events]
        _produce(stack_settings, topics["outcomes"], outcomes[: n // 2])

        def joined_outcomes() -> int:
            variants = api("GET", f"/deployments/{deployment}/metrics").json()["variants"]
            return sum(v["totals"]["outcomes"] for v in variants)

        # Killed as soon as it is visibly joining the first half: mid-work, not after a guess.
        deadline = time.monotonic() + 60
        while (joined_before_kill := joined_outcomes()) == 0:
            assert time.monotonic() < deadline, "the monitor joined no outcome in 60 s"
            time.sleep(0.05)
        os.killpg(monitor.pid, signal.SIGKILL)
        monitor.wait(10)
        assert 0 < joined_before_kill <= n // 2
        _produce(stack_settings, topics["outcomes"], outcomes[n // 2 :])
        monitor = _process("monitor", [f"{BIN}/carrara-monitor", "--metrics-port", "0"], env)

        # Offline truth from the output topic and the known labels.
        label = {e["card_id"]: e["fraud"] for e in events}
        offline: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for p in predictions:
            offline[p.variant].append((float(p.score), label[p.key]))

        deadline = time.monotonic() + 120
        while True:
            metrics = api("GET", f"/deployments/{deployment}/metrics").json()
            totals = {v["variant"]: v["totals"] for v in metrics["variants"]}
            joined = sum(t["outcomes"] for t in totals.values())
            if joined >= n or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert metrics["outcome_stats"]["matched"] == n
        assert metrics["outcome_stats"]["unmatched"] == 0
        for variant, pairs in offline.items():
            assert totals[variant]["predictions"] == len(pairs)  # exact counts, even after the kill
            assert totals[variant]["outcomes"] == len(pairs)
            # Each prediction carries its input record's timestamp: all counted end to end.
            assert sum(totals[variant]["end_to_end_histogram"]) == len(pairs)
            e2e = (totals[variant]["p50_end_to_end_ms"], totals[variant]["p99_end_to_end_ms"])
            assert 0 < e2e[0] <= e2e[1], e2e
            scores = np.array([s for s, _ in pairs])
            truth = np.array([y for _, y in pairs])
            assert abs(totals[variant]["auc"] - roc_auc_score(truth, scores)) < 1e-6
            accuracy = float(np.mean((scores >= 0.5) == (truth == 1)))
            assert abs(totals[variant]["accuracy"] - accuracy) < 1e-9

        verdict = api("GET", f"/deployments/{deployment}/verdict").json()
        (comparison,) = verdict["comparisons"]
        assert comparison["challenger"] == "b"
        if comparison["better"] is None:
            # The policy acted first: the verdict now covers the new revision's (few) outcomes.
            assert api("GET", f"/deployments/{deployment}").json()["revision"] > first_revision
        else:
            assert comparison["better"] == "champion"
            assert comparison["significant"] is True
            assert "champion better" in comparison["verdict"]

        # The policy rolls the worse variant back: a new revision, an alert, the evidence.
        deadline = time.monotonic() + 90
        while True:
            current = api("GET", f"/deployments/{deployment}").json()
            if current["revision"] > first_revision or time.monotonic() > deadline:
                break
            time.sleep(1)
        weights = {v["name"]: v["weight"] for v in current["spec"]["variants"]}
        assert weights == {"a": 100, "b": 0}
        alerts = api("GET", "/alerts", params={"deployment": deployment}).json()["items"]
        rollback = [a for a in alerts if a["kind"] == "auto_rollback"]
        assert rollback
        evidence = rollback[0]["details"]
        assert evidence["challenger"] == "b"
        assert evidence["mean_challenger"] > evidence["mean_champion"]  # b's log loss is worse
        assert evidence["p_value"] <= 0.05

        # Shifted inputs (amounts x 8) raise a drift alert on that feature.
        shifted = [_event(10_000 + i, shift=8.0) for i in range(4000)]
        _produce(
            stack_settings,
            topics["input"],
            [(e["card_id"], {k: v for k, v in e.items() if k != "fraud"}) for e in shifted],
        )
        deadline = time.monotonic() + 90
        while True:
            alerts = api(
                "GET", "/alerts", params={"deployment": deployment, "kind": "drift"}
            ).json()["items"]
            if alerts or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert [a["details"]["feature"] for a in alerts] == ["amount"]
        drift = api("GET", f"/deployments/{deployment}/drift").json()
        flagged = {f["feature"]: f["drifted"] for f in drift["features"]}
        assert flagged["amount"] is True
        assert flagged["merchant"] is False
    finally:
        for proc in (scorer, monitor):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
