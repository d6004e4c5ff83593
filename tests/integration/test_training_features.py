"""A training run with a feature set, against the real Kafka and MLflow: the replay starts the
horizon before the snapshot (by timestamp), its rows equal what the operator computes over the
whole log (what a scorer running since the first event computes), and the model version records
the feature-set revision, its digest and its SQL."""

from __future__ import annotations

import uuid
from typing import Any

import mlflow
import numpy as np
import orjson
from confluent_kafka import Producer
from mlflow import MlflowClient

from carrara.features.operator import PartitionedOperator
from carrara.features.plan import COLUMN_PREFIX
from carrara.features.sql import parse_feature_sql
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from carrara.training import pipeline
from carrara.training.algorithms import validate_params

BASE_MS = 1_714_564_800_000
MINUTE = 60_000
SQL = """SELECT LN(amount + 1) AS log_amount,
  COUNT(*) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS n_1h,
  AVG(amount) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '30' MINUTE PRECEDING) AS avg_30m,
  ts - LAG(ts) OVER (PARTITION BY user ORDER BY ts) AS gap
FROM {name}"""
FIELDS = [{"name": "amount", "type": "float"}]


class Beat:
    progress = 0

    def beat(self) -> None:
        pass

    def check(self) -> None:
        pass


def _events() -> list[tuple[int, dict[str, Any]]]:
    events = []
    for i in range(240):
        key = i % 4
        # Ties (every third event shares its predecessor's time) and some out-of-order times.
        ts = BASE_MS + (i - i % 3) * 3 * MINUTE - (20 * MINUTE if i % 11 == 0 else 0)
        event = {"user": f"u{key}", "ts": ts, "amount": float(i % 17), "fraud": i % 5 == 0}
        events.append((key % 2, event))
    return events


def test_training_replays_through_the_operator_from_the_horizon_before_the_snapshot(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    events = _events()
    for partition, event in events:
        producer.produce(
            topic_name, value=orjson.dumps(event), partition=partition, timestamp=event["ts"]
        )
    assert producer.flush(30) == 0
    name = f"fs-train-{uuid.uuid4().hex[:8]}"
    sql = SQL.format(name=f'"{name}"')
    schema = {
        "key_field": "user",
        "event_time_field": "ts",
        "label_field": "fraud",
        "task": "binary",
        "features": FIELDS,
        "format": "json",
        "subject": None,
    }
    plan = parse_feature_sql(
        sql, key_field="user", time_field="ts", fields={"amount": "float"}, label_field="fraud"
    )
    offsets = [{"partition": p, "start": 60, "end": 120} for p in (0, 1)]
    job = pipeline.Job(
        run_id=1,
        attempt=1,
        algorithm="logistic_regression",
        params=validate_params("logistic_regression", "binary", {}),
        holdout={"method": "hash", "fraction": 0.2, "seed": 0},
        registered_model_name=f"fs-model-{uuid.uuid4().hex[:8]}",
        dataset=name,
        dataset_version=1,
        topic=topic_name,
        offsets=offsets,
        event_count=120,
        schema=schema,
        feature_set={
            "number": 3,
            "sql": sql,
            "late_policy": "cap",
            "allowed_lateness_ms": 0,
            "digest": plan.digest,
        },
    )
    decoded = pipeline._replay(job, stack_settings, Beat())
    derived = pipeline._derive(job, stack_settings, Beat(), decoded)

    # Each partition holds 120 events two keys apart, 6 minutes a pair: the hour before offset 60
    # is about 10 records; the warm-up starts there, not at 0.
    warm = {r["partition"]: r for r in derived.warmup}
    assert set(warm) == {0, 1}
    for r in warm.values():
        assert 40 < r["start"] < 60
        assert r["end"] == 60

    # What a scorer that saw every event from offset 0 computes, per (partition, offset).
    online = PartitionedOperator(plan)
    expected: dict[tuple[int, int], list[float]] = {}
    seen = {0: 0, 1: 0}
    for partition, event in events:
        offset = seen[partition]
        seen[partition] += 1
        result = online.process(partition, event["user"], event["ts"], event)
        expected[(partition, offset)] = result.values
    assert derived.matrix.shape == (120, 4)
    for i in range(decoded.rows):
        key = (int(decoded.partitions[i]), int(decoded.offsets[i]))
        assert 60 <= key[1] < 120
        np.testing.assert_array_equal(derived.matrix[i], np.array(expected[key]), err_msg=str(key))
    assert derived.late_events > 0

    outcome = pipeline.execute(job, stack_settings, Beat())
    assert outcome.results["feature_set"]["revision"] == 3
    assert outcome.results["feature_set"]["warmup"] == derived.warmup
    mlflow.set_tracking_uri(stack_settings.mlflow_url)
    run = MlflowClient().get_run(outcome.mlflow_run_id)
    assert run.data.params["feature_set_revision"] == "3"
    assert run.data.params["feature_set_digest"] == plan.digest
    assert run.data.tags["carrara.feature_set_digest"] == plan.digest
    recorded = mlflow.artifacts.load_dict(f"runs:/{outcome.mlflow_run_id}/feature_set.json")
    assert recorded["sql"] == sql
    assert [o["name"] for o in recorded["outputs"]] == plan.names
    card = mlflow.artifacts.load_dict(f"runs:/{outcome.mlflow_run_id}/carrara_model.json")
    assert card["feature_spec"]["feature_set"]["digest"] == plan.digest
    assert [COLUMN_PREFIX + n for n in plan.names] == card["feature_names"][-4:]
