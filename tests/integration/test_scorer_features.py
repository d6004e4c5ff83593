"""Feature sets online (issue 15): a scorer computes a model's feature set in its micro-batches,
with per-partition state in a changelog inside its transactions, against real Kafka and MLflow.

One model is trained by the training pipeline on a snapshot with a feature set. A deployment with
`include_features` then scores the same log from its first offset. The test holds, per input
offset:
- the feature vector the scorer wrote equals the training row the replay produced;
- after a kill -9 mid-stream (exactly-once), every offset is answered once, with the features and
  the score an uninterrupted run gives (the reference operator over the whole log);
- partitions that move to another scorer continue from the state restored from the changelog.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import mlflow
import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from carrara.features.operator import PartitionedOperator
from carrara.features.sql import parse_feature_sql
from carrara.scoring.feature_state import changelog_topic
from carrara.scoring.model_runtime import ModelCache
from carrara.settings import Settings
from carrara.streams.client_config import producer_config
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, encode_spec
from carrara.streams.event_codec import FeatureSpec, decode_events
from carrara.streams.prediction_record import Prediction, decode_prediction
from carrara.streams.topics import TopicAdmin
from carrara.training import pipeline
from carrara.training.algorithms import validate_params
from tests.integration.conftest import RUN_ID
from tests.integration.test_scorer import ScoringEnv
from tests.integration.test_training_features import Beat

MINUTE = 60_000
KEYS = 8
SQL = """SELECT LN(amount + 1) AS log_amount,
  COUNT(*) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS n_1h,
  AVG(amount) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '30' MINUTE PRECEDING) AS avg_30m,
  MAX(amount) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '10' MINUTE PRECEDING) AS max_10m,
  COUNT(DISTINCT merchant) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '20' MINUTE PRECEDING)
    AS merchants_20m,
  ts - LAG(ts) OVER (PARTITION BY user ORDER BY ts) AS gap
FROM {name}"""
SCHEMA: dict[str, Any] = {
    "key_field": "user",
    "event_time_field": "ts",
    "label_field": "fraud",
    "task": "binary",
    "features": [
        {"name": "amount", "type": "float"},
        {"name": "merchant", "type": "category"},
    ],
    "format": "json",
    "subject": None,
}


def _event(i: int, base_ms: int) -> tuple[int, dict[str, Any]]:
    """Event i: 8 users, two partitions, ties (every third shares its predecessor's time) and
    out-of-order times (every 13th is 5 minutes early)."""
    user = i % KEYS
    ts = base_ms + (i - i % 3) * 1_000 - (5 * MINUTE if i % 13 == 0 else 0)
    amount = float((i * 7) % 23)
    event = {
        "user": f"u{user}",
        "ts": ts,
        "amount": amount,
        "merchant": ["grocery", "online", "travel", "fuel"][(i // 3) % 4],
        "fraud": int((amount > 15) != (i % 17 == 0)),
    }
    return user % 2, event


class Log:
    """The input topic and every event produced to it, in partition order."""

    def __init__(self, settings: Settings, topic: str, base_ms: int) -> None:
        self.settings = settings
        self.topic = topic
        self.base_ms = base_ms
        self.events: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
        self.produced = 0

    def produce(self, count: int, per_second: float | None = None) -> None:
        producer = Producer(producer_config(self.settings.kafka_bootstrap))
        started = time.monotonic()
        for n in range(count):
            partition, event = _event(self.produced, self.base_ms)
            self.produced += 1
            self.events[partition].append(event)
            producer.produce(
                self.topic,
                key=event["user"].encode(),
                value=orjson.dumps(event),
                partition=partition,
                timestamp=event["ts"],
            )
            producer.poll(0)
            if per_second is not None:
                ahead = started + n / per_second - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        assert producer.flush(30) == 0

    def reference(self, plan: Any, spec: FeatureSpec) -> dict[tuple[int, int], np.ndarray]:
        """What an uninterrupted scorer computes per (partition, offset): raw columns, then the
        feature set over the whole log in log order."""
        operator = PartitionedOperator(plan)
        rows: dict[tuple[int, int], np.ndarray] = {}
        for partition, events in self.events.items():
            values = [orjson.dumps(e) for e in events]
            decoded = decode_events(
                SCHEMA, [(values, [partition] * len(values), range(len(values)))]
            )
            raw = spec.transform(decoded)
            for offset, event in enumerate(events):
                derived = operator.process(partition, event["user"], event["ts"], event).values
                rows[(partition, offset)] = np.concatenate([raw[offset], derived])
        return rows


@pytest.fixture(scope="module")
def trained(stack_settings: Settings) -> Iterator[dict[str, Any]]:
    """600 events on a two-partition topic and a model trained on them with the feature set."""
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    topics = {
        name: f"test-{RUN_ID}-features-{name}-{uuid.uuid4().hex[:6]}"
        for name in ("input", "output", "deployments", "status")
    }
    admin.create_topic(topics["input"], partitions=2)
    admin.create_topic(topics["output"], partitions=2)
    admin.ensure_compacted_topic(topics["deployments"])
    admin.ensure_compacted_topic(topics["status"])
    # Event times a few hours back (recent enough that retention keeps them).
    base_ms = int((datetime.now(UTC) - timedelta(hours=6)).timestamp() * 1000)
    log = Log(stack_settings, topics["input"], base_ms)
    log.produce(600)
    name = f"fs-online-{uuid.uuid4().hex[:8]}"
    sql = SQL.format(name=f'"{name}"')
    plan = parse_feature_sql(
        sql,
        key_field="user",
        time_field="ts",
        fields={"amount": "float", "merchant": "category"},
        label_field="fraud",
    )
    job = pipeline.Job(
        run_id=1,
        attempt=1,
        algorithm="logistic_regression",
        params=validate_params("logistic_regression", "binary", {}),
        holdout={"method": "hash", "fraction": 0.2, "seed": 0},
        registered_model_name=f"fs-online-model-{RUN_ID}-{uuid.uuid4().hex[:6]}",
        dataset=name,
        dataset_version=1,
        topic=topics["input"],
        offsets=[{"partition": p, "start": 0, "end": len(log.events[p])} for p in (0, 1)],
        event_count=600,
        schema=SCHEMA,
        feature_set={
            "number": 1,
            "sql": sql,
            "late_policy": "cap",
            "allowed_lateness_ms": 0,
            "digest": plan.digest,
        },
    )
    outcome = pipeline.execute(job, stack_settings, Beat())
    mlflow.set_tracking_uri(stack_settings.mlflow_url)
    card = mlflow.artifacts.load_dict(f"runs:/{outcome.mlflow_run_id}/carrara_model.json")
    spec = FeatureSpec.from_dict(card["feature_spec"])
    # The training rows, as the run built them: the replay decoded, the spec's columns, then
    # the feature set through the operator.
    decoded = pipeline._replay(job, stack_settings, Beat())
    derived = pipeline._derive(job, stack_settings, Beat(), decoded)
    matrix = np.hstack([spec.transform(decoded), derived.matrix])
    training_rows = {
        (int(p), int(o)): matrix[i]
        for i, (p, o) in enumerate(zip(decoded.partitions, decoded.offsets, strict=True))
    }
    env = ScoringEnv(stack_settings, job.registered_model_name, {"v": outcome.version}, topics)
    yield {
        "env": env,
        "log": log,
        "plan": plan,
        "spec": spec,
        "version": outcome.version,
        "training_rows": training_rows,
        "base_ms": base_ms,
    }
    for instance in list(env.processes):
        env.stop_scorer(instance, signal.SIGKILL)
    admin.delete_topics([*topics.values(), f"{topics['input']}.dead-letters"])


def _publish(trained: dict[str, Any], pool: str, name: str) -> None:
    env: ScoringEnv = trained["env"]
    spec = DeploymentSpec(
        name=name,
        revision=1,
        salt="features",
        # Before the first event: the deployment scores the log from its first offset.
        published_at=datetime.fromtimestamp(trained["base_ms"] / 1000 - 3600, UTC),
        input_topic=env.topics["input"],
        output_topic=env.topics["output"],
        key_field="user",
        pool=pool,
        include_features=True,
        variants=(
            VariantSpec(
                name="a", model_name=env.model, model_version=trained["version"], weight=100
            ),
        ),
    )
    producer = Producer(producer_config(env.settings.kafka_bootstrap))
    producer.produce(env.topics["deployments"], key=name, value=encode_spec(spec))
    assert producer.flush(10) == 0


def _answers(env: ScoringEnv, name: str, expected: int, timeout: float = 180) -> list[Prediction]:
    """The deployment's committed predictions once `expected` distinct offsets are answered."""
    deadline = time.monotonic() + timeout
    while True:
        outputs = [decode_prediction(m.value()) for m in env.read(env.topics["output"], 0, 1)]
        ours = [p for p in outputs if p.deployment == name]
        if len({(p.partition, p.offset) for p in ours}) >= expected:
            return ours
        assert time.monotonic() < deadline, f"{len(ours)} of {expected} answered"


def _vector(prediction: Prediction, columns: list[str]) -> np.ndarray:
    features = prediction.features
    assert features is not None
    assert list(features) == columns
    return np.array([np.nan if v is None else v for v in features.values()], dtype=np.float64)


def _assert_rows(
    predictions: list[Prediction], expected: dict[tuple[int, int], np.ndarray], columns: list[str]
) -> None:
    for p in predictions:
        np.testing.assert_array_equal(
            _vector(p, columns),
            expected[(p.partition, p.offset)],
            err_msg=f"{p.partition}/{p.offset}",
        )


def test_scorer_features_equal_training_rows_and_survive_kill_and_partition_moves(
    trained: dict[str, Any],
) -> None:
    env: ScoringEnv = trained["env"]
    log: Log = trained["log"]
    spec: FeatureSpec = trained["spec"]
    columns = spec.model_columns
    assert columns[-6:] == [f"sql.{n}" for n in trained["plan"].names]
    pool = f"fs-pool-{uuid.uuid4().hex[:6]}"
    name = f"fs-{uuid.uuid4().hex[:6]}"
    _publish(trained, pool, name)
    env.start_scorer("fs-1", pool)
    env.wait_ready("fs-1")

    # 1. The snapshot's events, scored from offset 0: every vector is its training row.
    first = _answers(env, name, 600)
    assert len(first) == 600
    _assert_rows(first, trained["training_rows"], columns)
    changelog = changelog_topic(name, trained["plan"].digest)
    assert len(TopicAdmin(env.settings.kafka_bootstrap).partitions(changelog)) == 2

    # 2. kill -9 while a stream is being scored; the restarted scorer restores its state.
    producing = threading.Thread(target=log.produce, args=(3000, 400.0))
    producing.start()
    deadline = time.monotonic() + 60
    while len({(p.partition, p.offset) for p in _answers(env, name, 0)}) < 700:
        assert time.monotonic() < deadline, "the stream is not being scored"
    mid_stream = producing.is_alive()
    env.stop_scorer("fs-1", signal.SIGKILL)
    at_kill = len({(p.partition, p.offset) for p in _answers(env, name, 0)})
    producing.join()
    assert mid_stream, "the stream was fully produced before the kill"
    assert at_kill < 3600, "the kill landed after the stream was answered"
    env.start_scorer("fs-1", pool)

    # 3. A second scorer joins: a partition moves to it and continues from the changelog.
    env.start_scorer("fs-2", pool)
    env.wait_ready("fs-2")
    _answers(env, name, 3600)
    deadline = time.monotonic() + 120
    while _owners(env.settings, name) != [1, 1]:  # until a partition has moved to fs-2
        assert time.monotonic() < deadline, f"no partition moved: {_owners(env.settings, name)}"
        time.sleep(0.5)
    log.produce(1000, 2000.0)
    env.stop_scorer("fs-1")  # and everything moves to fs-2
    log.produce(800, 2000.0)

    total = log.produced
    answered = _answers(env, name, total)
    counts = Counter((p.partition, p.offset) for p in answered)
    assert len(counts) == total
    assert max(counts.values()) == 1, "an offset was answered twice under exactly-once"
    reference = log.reference(trained["plan"], spec)
    _assert_rows(answered, reference, columns)
    # And the scores an uninterrupted run gives.
    model = ModelCache(env.settings.mlflow_url).get(env.model, trained["version"])
    ordered = sorted(answered, key=lambda p: (p.partition, p.offset))
    matrix = np.vstack([reference[(p.partition, p.offset)] for p in ordered])
    np.testing.assert_allclose(
        [p.score for p in ordered], model.scores(matrix), rtol=1e-5, atol=1e-6
    )
    # fs-2 restored partitions it did not start with.
    assert _restores(env.ports["fs-2"], name) >= 1
    env.stop_scorer("fs-2")


def _metrics(port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def _owners(settings: Settings, name: str) -> list[int]:
    """How many input partitions each member of the deployment's consumer group holds."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    group = f"carrara-scorer.{name}"
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return sorted(len(m.assignment.topic_partitions) for m in described.members)


def _restores(port: int, name: str) -> float:
    for line in _metrics(port).splitlines():
        if line.startswith("carrara_scorer_feature_restore_seconds_count{") and name in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
