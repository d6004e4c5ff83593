"""The streaming scorer as it runs in production: a real process, real Kafka, models from MLflow.

Deployments are pushed as records on a (test-specific) deployments topic, exactly as the control
plane publishes them; the scorer process learns everything from Kafka and MLflow.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from carrara.scoring.splitter import Splitter
from carrara.settings import Settings
from carrara.streams.client_config import producer_config
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, encode_spec
from carrara.streams.event_codec import decode_events, fit_feature_spec
from carrara.streams.prediction_record import H_ERROR_CLASS, H_SOURCE_OFFSET, decode_prediction
from carrara.streams.scorer_status import decode_status
from carrara.streams.topics import TopicAdmin
from carrara.training.algorithms import validate_params
from carrara.training.mlflow_logging import Lineage, log_and_register
from carrara.training.onnx_export import export_onnx
from carrara.training.trainers import train
from tests.integration.conftest import ROOT, RUN_ID

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _event(i: int, key: str | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    return {
        "card_id": key if key is not None else f"card-{i}",
        "amount": float(rng.lognormal(3, 1)),
        "velocity": float(rng.poisson(2)),
        "merchant": ["grocery", "online", "travel"][i % 3],
    }


@dataclass
class ScoringEnv:
    settings: Settings
    model: str
    versions: dict[str, int]
    topics: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    revision: int = 0

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CARRARA_DEPLOYMENTS_TOPIC": self.topics["deployments"],
            "CARRARA_SCORER_STATUS_TOPIC": self.topics["status"],
            "CARRARA_SCORER_MAX_EVENT_BYTES": "100000",
        }

    def start_scorer(self, instance: str, pool: str, delivery: str = "exactly_once") -> None:
        port = _free_port()
        log = ROOT / ".carrara" / "logs" / f"test-scorer-{RUN_ID}-{instance}.log"
        with log.open("ab") as out:
            self.processes[instance] = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "carrara-scorer"),
                    "--pool",
                    pool,
                    "--instance-id",
                    instance,
                    "--metrics-port",
                    str(port),
                ],
                cwd=ROOT,
                env={**self.env, "CARRARA_SCORER_DELIVERY": delivery},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ports[instance] = port

    def wait_ready(self, instance: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.ports[instance]}/readyz"
        while True:
            proc = self.processes[instance]
            assert proc.poll() is None, f"scorer {instance} exited with {proc.returncode}"
            try:
                response = httpx.get(url, timeout=2)
                body = response.json()
                if response.status_code == 200 and body["deployments"]:
                    return body
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"scorer {instance} not ready"
            time.sleep(0.3)

    def stop_scorer(self, instance: str, sig: int = signal.SIGTERM) -> None:
        proc = self.processes.pop(instance)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=90)

    def publish(
        self, variants: list[VariantSpec], pool: str, name: str = "fraud"
    ) -> DeploymentSpec:
        self.revision += 1
        spec = DeploymentSpec(
            name=name,
            revision=self.revision,
            salt=f"salt-{RUN_ID}",
            published_at=datetime.now(UTC),
            input_topic=self.topics["input"],
            output_topic=self.topics["output"],
            key_field="card_id",
            pool=pool,
            variants=tuple(variants),
        )
        producer = Producer(producer_config(self.settings.kafka_bootstrap))
        producer.produce(self.topics["deployments"], key=name, value=encode_spec(spec))
        assert producer.flush(10) == 0
        return spec

    def produce(self, values: list[bytes], keys: list[bytes | None]) -> None:
        producer = Producer(producer_config(self.settings.kafka_bootstrap))
        for key, value in zip(keys, values, strict=True):
            producer.produce(self.topics["input"], key=key, value=value)
            producer.poll(0)
        assert producer.flush(30) == 0

    def read(self, topic: str, expected: int, timeout: float = 120) -> list[Any]:
        """Read `topic` from the start (committed records only) until `expected` records."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        consumer.subscribe([topic])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(m for m in consumer.consume(1000, timeout=0.5) if m.error() is None)
        # A little longer, to catch duplicates beyond the expected count.
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            records.extend(m for m in consumer.consume(1000, timeout=0.3) if m.error() is None)
        consumer.close()
        return records


def _register(settings: Settings, name: str, c: float) -> tuple[int, Any]:
    rng = np.random.default_rng(int(c * 100))
    events = []
    for i in range(600):
        e = _event(i)
        e["fraud"] = int(e["amount"] * 0.02 + e["velocity"] * 0.5 + rng.normal() > 2.5)
        events.append(orjson.dumps(e))
    decoded = decode_events(SCHEMA, [(events, [0] * 600, list(range(600)))])
    spec = fit_feature_spec(decoded)
    x, y = spec.transform(decoded), spec.encode_labels(decoded)
    params = validate_params("logistic_regression", "binary", {"C": c})
    model = train("logistic_regression", "binary", params, x, y)
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage("scorer-test", 1, "t", [{"partition": 0, "start": 0, "end": 600}], 600, 0),
        algorithm="logistic_regression",
        params=params,
        metrics={},
        trained=model,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=x[:100],
        holdout_y=y[:100],
        onnx=export_onnx(model, x[:100]),
    )
    return logged.version, spec


@pytest.fixture(scope="module")
def scoring(stack_settings: Settings) -> Iterator[ScoringEnv]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    topics = {
        name: f"test-{RUN_ID}-scorer-{name}-{uuid.uuid4().hex[:6]}"
        for name in ("input", "output", "deployments", "status")
    }
    admin.create_topic(topics["input"], partitions=3)
    admin.create_topic(topics["output"], partitions=3)
    admin.ensure_compacted_topic(topics["deployments"])
    admin.ensure_compacted_topic(topics["status"])
    model = f"scorer-test-{RUN_ID}"
    v1, _ = _register(stack_settings, model, 1.0)
    v2, _ = _register(stack_settings, model, 0.01)
    env = ScoringEnv(stack_settings, model, {"v1": v1, "v2": v2}, topics)
    yield env
    for instance in list(env.processes):
        env.stop_scorer(instance, signal.SIGKILL)
    admin.delete_topics([*topics.values(), f"{topics['input']}.dead-letters"])


def _variants(
    model: str, versions: dict[str, int], a: int, b: int, shadow: bool = False
) -> list[VariantSpec]:
    variants = [
        VariantSpec(name="a", model_name=model, model_version=versions["v1"], weight=a),
        VariantSpec(name="b", model_name=model, model_version=versions["v2"], weight=b),
    ]
    if shadow:
        variants.append(
            VariantSpec(
                name="s", model_name=model, model_version=versions["v2"], weight=0, shadow=True
            )
        )
    return variants


def test_scorer_splits_shadows_dead_letters_and_survives_restart_and_kill(
    scoring: ScoringEnv,
) -> None:
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    spec = scoring.publish(_variants(scoring.model, scoring.versions, 90, 10, shadow=True), pool)
    scoring.start_scorer("scorer-1", pool)
    ready = scoring.wait_ready("scorer-1")
    assert ready["deployments"] == {"fraud": "serving"}

    # 20,000 distinct keys, plus one event of each bad kind.
    n = 20_000
    scoring.produce(
        [orjson.dumps(_event(i)) for i in range(n)], [f"card-{i}".encode() for i in range(n)]
    )
    bad = [
        b"not json",
        orjson.dumps({"card_id": "x", "amount": "lots"}),
        b"[1]",
        b'{"card_id": "big", "pad": "' + b"x" * 200_000 + b'"}',
    ]
    scoring.produce(bad, [b"bad"] * len(bad))

    outputs = [decode_prediction(m.value()) for m in scoring.read(scoring.topics["output"], 2 * n)]
    served = [p for p in outputs if not p.shadow]
    shadows = [p for p in outputs if p.shadow]
    assert len(served) == n  # exactly one served prediction per good input event
    assert len({(p.partition, p.offset) for p in served}) == n
    assert len(shadows) == n
    assert {p.variant for p in shadows} == {"s"}
    share_b = Counter(p.variant for p in served)["b"] / n
    assert abs(share_b - 0.10) <= 0.02
    splitter = Splitter(spec.salt, spec.variants)
    assert all(splitter.choose(p.key).name == p.variant for p in served[:2000])
    variant_of = {p.key: p.variant for p in served}

    dead = scoring.read(f"{scoring.topics['input']}.dead-letters", len(bad))
    classes = sorted(dict(m.headers())[H_ERROR_CLASS].decode() for m in dead)
    assert classes == ["invalid-event", "oversized", "undecodable", "undecodable"]
    assert all(dict(m.headers())[H_SOURCE_OFFSET] for m in dead)

    metrics = httpx.get(f"http://127.0.0.1:{scoring.ports['scorer-1']}/metrics", timeout=5).text
    assert (
        'carrara_scorer_predictions_total{deployment="fraud",shadow="false",variant="b"}' in metrics
    )

    # A clean restart keeps every key on its variant.
    scoring.stop_scorer("scorer-1")
    scoring.start_scorer("scorer-1", pool)
    scoring.wait_ready("scorer-1")
    again = list(range(0, n, 10))
    scoring.produce([orjson.dumps(_event(i)) for i in again], [f"card-{i}".encode() for i in again])
    outputs = [
        decode_prediction(m.value())
        for m in scoring.read(scoring.topics["output"], 2 * (n + len(again)))
    ]
    by_key: dict[str, list[str]] = {}
    for p in outputs:
        if not p.shadow:
            by_key.setdefault(p.key, []).append(p.variant)
    for i in again:
        variants = by_key[f"card-{i}"]
        assert len(variants) == 2
        assert set(variants) == {variant_of[f"card-{i}"]}

    # kill -9 mid-stream, restart: no input lost, none answered twice (exactly-once).
    total_before = n + len(again)
    stream = [orjson.dumps(_event(100_000 + i)) for i in range(6000)]
    keys = [f"card-{100_000 + i}".encode() for i in range(6000)]
    producer = threading.Thread(target=scoring.produce, args=(stream, keys))
    producer.start()
    time.sleep(0.5)
    scoring.stop_scorer("scorer-1", signal.SIGKILL)
    producer.join()
    scoring.start_scorer("scorer-1", pool)
    outputs = [
        decode_prediction(m.value())
        for m in scoring.read(scoring.topics["output"], 2 * (total_before + 6000), timeout=180)
    ]
    served = [p for p in outputs if not p.shadow]
    positions = Counter((p.partition, p.offset) for p in served)
    assert len(positions) == total_before + 6000
    assert max(positions.values()) == 1


def test_a_deployment_change_under_load_and_a_broken_version(
    scoring: ScoringEnv, stack_settings: Settings
) -> None:
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    name = f"change-{uuid.uuid4().hex[:6]}"
    first = scoring.publish(_variants(scoring.model, scoring.versions, 100, 0), pool, name=name)
    scoring.start_scorer("scorer-2", pool)
    scoring.wait_ready("scorer-2")
    before = len([m for m in scoring.read(scoring.topics["output"], 0, timeout=1)])

    stream = [orjson.dumps(_event(200_000 + i)) for i in range(8000)]
    keys = [f"card-{200_000 + i}".encode() for i in range(8000)]
    producer = threading.Thread(target=scoring.produce, args=(stream, keys))
    producer.start()
    time.sleep(0.3)
    second = scoring.publish(_variants(scoring.model, scoring.versions, 50, 50), pool, name=name)
    producer.join()
    outputs = [
        decode_prediction(m.value()) for m in scoring.read(scoring.topics["output"], before + 8000)
    ]
    ours = [p for p in outputs if p.deployment == name]
    positions = Counter((p.partition, p.offset) for p in ours)
    assert len(ours) == 8000
    assert max(positions.values()) == 1  # every input offset answered exactly once
    revisions = Counter(p.revision for p in ours)
    assert set(revisions) <= {first.revision, second.revision}
    for p in ours:
        spec = first if p.revision == first.revision else second
        assert Splitter(spec.salt, spec.variants).choose(p.key).name == p.variant

    # A version that cannot load is rejected; the previous revision keeps serving.
    broken = scoring.publish(
        [VariantSpec(name="a", model_name=scoring.model, model_version=999, weight=100)],
        pool,
        name=name,
    )
    deadline = time.monotonic() + 60
    while True:
        body = httpx.get(f"http://127.0.0.1:{scoring.ports['scorer-2']}/readyz", timeout=5).json()
        status = _status_of(scoring, "scorer-2", name)
        if status and status.last_error and f"revision {broken.revision}" in status.last_error:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    assert status.served_revision == second.revision
    scoring.produce([orjson.dumps(_event(300_000))], [b"card-300000"])
    outputs = [
        decode_prediction(m.value()) for m in scoring.read(scoring.topics["output"], before + 8001)
    ]
    last = [p for p in outputs if p.deployment == name and p.key == "card-300000"]
    assert [p.revision for p in last] == [second.revision]

    # Stopped: its series leave the scorer's /metrics (they would be reported forever).
    metrics_url = f"http://127.0.0.1:{scoring.ports['scorer-2']}/metrics"
    assert f'deployment="{name}"' in httpx.get(metrics_url, timeout=5).text
    scoring.revision += 1
    stop = DeploymentSpec(
        name=name,
        revision=scoring.revision,
        salt=f"salt-{RUN_ID}",
        published_at=datetime.now(UTC),
        stopped=True,
    )
    producer = Producer(producer_config(scoring.settings.kafka_bootstrap))
    producer.produce(scoring.topics["deployments"], key=name, value=encode_spec(stop))
    assert producer.flush(10) == 0
    deadline = time.monotonic() + 60
    while f'deployment="{name}"' in httpx.get(metrics_url, timeout=5).text:
        assert time.monotonic() < deadline, "the stopped deployment's series stayed"
        time.sleep(0.3)
    scoring.stop_scorer("scorer-2")


def _status_of(scoring: ScoringEnv, instance: str, deployment: str) -> Any:
    consumer = Consumer(
        {
            "bootstrap.servers": scoring.settings.kafka_bootstrap,
            "group.id": f"status-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(scoring.topics["status"], 0, 0)])
    latest = None
    for m in consumer.consume(10_000, timeout=2):
        if m.error() is None and m.key() == instance.encode() and m.value():
            latest = decode_status(m.value())
    consumer.close()
    if latest is None:
        return None
    return next((d for d in latest.deployments if d.name == deployment), None)


def test_at_least_once_mode_answers_every_event_after_a_kill(scoring: ScoringEnv) -> None:
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    name = f"alo-{uuid.uuid4().hex[:6]}"
    scoring.publish(_variants(scoring.model, scoring.versions, 50, 50), pool, name=name)
    scoring.start_scorer("scorer-alo", pool, delivery="at_least_once")
    scoring.wait_ready("scorer-alo")
    stream = [orjson.dumps(_event(400_000 + i)) for i in range(6000)]
    keys = [f"card-{400_000 + i}".encode() for i in range(6000)]
    producer = threading.Thread(target=scoring.produce, args=(stream, keys))
    producer.start()
    time.sleep(0.5)
    scoring.stop_scorer("scorer-alo", signal.SIGKILL)
    producer.join()
    scoring.start_scorer("scorer-alo", pool, delivery="at_least_once")
    deadline = time.monotonic() + 180
    while True:
        outputs = [
            decode_prediction(m.value())
            for m in scoring.read(scoring.topics["output"], 0, timeout=1)
        ]
        answered = {(p.partition, p.offset) for p in outputs if p.deployment == name}
        if len(answered) >= 6000 or time.monotonic() > deadline:
            break
    assert len(answered) == 6000  # every input offset answered, possibly more than once
    scoring.stop_scorer("scorer-alo")


def test_at_least_once_scores_a_backlog_through(scoring: ScoringEnv) -> None:
    """A backlog keeps the loop producing while each batch's delivery is confirmed: a batch
    waits for its own delivery reports only (a `flush()` waited for the next batches too and
    never returned under a backlog: the loop stalled)."""
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    name = f"alo-backlog-{uuid.uuid4().hex[:6]}"
    count = 60_000
    stream = [orjson.dumps(_event(700_000 + i)) for i in range(count)]
    keys = [f"card-{700_000 + i}".encode() for i in range(count)]
    # Published first (a deployment scores from its publication time), then the backlog, then
    # the scorer: it starts with all of it waiting.
    scoring.publish(_variants(scoring.model, scoring.versions, 50, 50), pool, name=name)
    scoring.produce(stream, keys)
    scoring.start_scorer("scorer-alo-backlog", pool, delivery="at_least_once")
    scoring.wait_ready("scorer-alo-backlog")
    deadline = time.monotonic() + 120
    port = scoring.ports["scorer-alo-backlog"]
    consumed = 0.0
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        consumed = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("carrara_scorer_events_in_total{") and f'"{name}"' in line
        )
        if consumed >= count:
            break
        time.sleep(0.5)
    assert consumed >= count, f"{consumed:.0f} of {count} backlog events scored in 120 s"
    scoring.stop_scorer("scorer-alo-backlog")
