"""The monitor reads registry-framed inputs as the scorer does (real registry, broker, Postgres).

An Avro deployment's inputs, written with schema v1 and then v2 (a field added with a default),
plus a record without the framing and one with an unknown id: the drift counts the monitor writes
equal the training profile's bins applied offline to the values produced (v1 records counted with
the default, nulls as missing, the unreadable records not at all).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from sqlalchemy.orm import Session, sessionmaker

from carrara.db import make_engine
from carrara.models import Dataset, DatasetVersion, Deployment, DeploymentRevision, TrainingRun
from carrara.monitoring.drift import live_counts
from carrara.monitoring.monitor import Monitor
from carrara.monitoring.statistics import bin_counts, build_profile
from carrara.registry import service as registry_service
from carrara.settings import Settings
from carrara.streams.schema_registry import Registry, frame
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import RUN_ID, migrated_database

V1: dict[str, Any] = {
    "type": "record",
    "name": "Vitals",
    "namespace": "test.monitor",
    "fields": [
        {"name": "patient_id", "type": "string"},
        {
            "name": "vitals",
            "type": {
                "type": "record",
                "name": "Readings",
                "fields": [
                    {"name": "heart_rate", "type": "double"},
                    {"name": "spo2", "type": ["null", "double"], "default": None},
                ],
            },
        },
        {"name": "ward", "type": {"type": "enum", "name": "Ward", "symbols": ["A", "B", "C"]}},
        {"name": "critical", "type": "boolean"},
    ],
}
V2: dict[str, Any] = {
    **V1,
    "fields": [*V1["fields"], {"name": "temperature", "type": "double", "default": 36.6}],
}
FEATURES = [
    {"name": "heart_rate", "type": "float", "path": "vitals.heart_rate"},
    {"name": "spo2", "type": "float", "path": "vitals.spo2"},
    {"name": "ward", "type": "category"},
    {"name": "temperature", "type": "float", "default": 36.6},
]


def _vital(i: int, v2: bool, shift: float = 0.0) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    heart = float(rng.normal(80 + shift, 15))
    record: dict[str, Any] = {
        "patient_id": f"p-{i % 50}",
        "vitals": {"heart_rate": heart, "spo2": None if i % 10 == 0 else float(rng.normal(96, 2))},
        "ward": "ABC"[i % 3] if i % 7 else "C",
        "critical": heart > 95,
    }
    if v2:
        record["temperature"] = float(rng.normal(37.0, 0.4))
    return record


def _features(record: dict[str, Any]) -> dict[str, Any]:
    """The feature values the monitor should count for `record` (v1: the default temperature)."""
    return {
        "heart_rate": record["vitals"]["heart_rate"],
        "spo2": record["vitals"]["spo2"],
        "ward": record["ward"],
        "temperature": record.get("temperature", 36.6),
    }


def _avro(schema: dict[str, Any], schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return frame(schema_id, out.getvalue())


@pytest.fixture
def registry(stack_settings: Settings) -> Registry:
    url = stack_settings.schema_registry_url
    try:
        httpx.get(f"{url}/subjects", timeout=3).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"the Schema Registry at {url} is not running (carrara stack up): {exc}")
    return Registry(SchemaRegistryClient({"url": url}), url)


@pytest.fixture
def own_database(stack_settings: Settings) -> Iterator[str]:
    """A database of its own: a monitor watches every running deployment of its database."""
    with migrated_database(stack_settings, f"carrara_test_{RUN_ID}_monitor_avro") as url:
        yield url


def _watch(session: Session, topic: str, output: str, model: str) -> str:
    """An Avro dataset, a run on it, the version it registered (with its training profile) and
    a running deployment serving that version."""
    dataset = Dataset(
        name=f"vitals-{uuid.uuid4().hex[:6]}",
        topic=topic,
        key_field="patient_id",
        label_field="critical",
        task="binary",
        features=FEATURES,
        format="avro",
        subject=f"{topic}-value",
    )
    session.add(dataset)
    session.flush()
    version = DatasetVersion(
        dataset_id=dataset.id,
        number=1,
        offsets=[{"partition": 0, "start": 0, "end": 1}],
        event_count=1,
    )
    session.add(version)
    session.flush()
    run = TrainingRun(
        dataset_version_id=version.id,
        algorithm="logistic_regression",
        registered_model_name=model,
        status="succeeded",
    )
    session.add(run)
    session.flush()
    registered = registry_service.register_version(
        session, model, 1, run.id, f"models:/{model}/1", {}
    )
    training = [_features(_vital(i, v2=i % 2 == 0)) for i in range(1000, 1600)]
    registered.feature_profile = {
        "task": "binary",
        "label_classes": [False, True],
        "features": {
            name: build_profile(
                [row[name] for row in training], "category" if name == "ward" else "numeric"
            )
            for name in ("heart_rate", "spo2", "ward", "temperature")
        },
    }
    name = f"vitals-{uuid.uuid4().hex[:6]}"
    deployment = Deployment(name=name, current_revision=1)
    session.add(deployment)
    session.flush()
    spec = {
        "input_topic": topic,
        "output_topic": output,
        "key_field": "patient_id",
        "pool": "default",
        "variants": [{"name": "a", "model": model, "version": 1, "weight": 100, "shadow": False}],
    }
    session.add(DeploymentRevision(deployment_id=deployment.id, number=1, spec=spec, spec_hash="x"))
    return name


def test_the_monitor_counts_drift_of_avro_inputs_across_a_schema_change(
    stack_settings: Settings, registry: Registry, own_database: str
) -> None:
    suffix = f"{RUN_ID}-{uuid.uuid4().hex[:6]}"
    topic, output = f"test-monitor-avro-{suffix}", f"test-monitor-avro-{suffix}-out"
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    admin.create_topic(topic, 2)
    admin.create_topic(output, 1)
    subject = f"{topic}-value"
    engine = make_engine(own_database)
    sessions = sessionmaker(engine)
    settings = stack_settings.model_copy(update={"database_url": own_database})
    monitor = Monitor(settings, sessions)
    thread = threading.Thread(target=monitor.run, daemon=True)
    try:
        v1 = registry.register(subject, Schema(orjson.dumps(V1).decode(), "AVRO"))
        v2 = registry.register(subject, Schema(orjson.dumps(V2).decode(), "AVRO"))
        with sessions() as session, session.begin():
            name = _watch(session, topic, output, f"monitor-avro-{suffix}")
        # Live inputs, shifted: v1 then v2 records, and two the monitor cannot read.
        records = [_vital(i, v2=False, shift=25) for i in range(150)]
        records += [_vital(i, v2=True, shift=25) for i in range(150, 300)]
        values = [_avro(V1, v1, r) for r in records[:150]]
        values += [_avro(V2, v2, r) for r in records[150:]]
        values += [orjson.dumps({"patient_id": "json"}), frame(987_654, b"\x02ab")]
        producer = Producer({"bootstrap.servers": stack_settings.kafka_bootstrap})
        for i, value in enumerate(values):
            producer.produce(topic, key=f"p-{i % 50}".encode(), value=value)
        assert producer.flush(30) == 0
        thread.start()

        expected = {}
        with sessions() as session:
            version = registry_service.get_version(session, f"monitor-avro-{suffix}", 1)
            profile = version.feature_profile
            assert profile is not None
            version_id = version.id
        for feature, spec in profile["features"].items():
            column = [_features(r)[feature] for r in records]
            counts = bin_counts(spec, column)
            expected[feature] = (counts, len(column) - sum(counts))
        start = datetime.now(UTC) - timedelta(hours=1)

        def counted() -> dict[str, tuple[list[int], int]]:
            with sessions() as session:
                live = live_counts(session, name, version_id, start, None)
            return {f: (live.counts.get(f, []), live.missing.get(f, 0)) for f in expected}

        deadline = time.monotonic() + 90
        seen = counted()
        while any(sum(c) + m < len(records) for c, m in seen.values()):
            assert time.monotonic() < deadline, (
                f"drift counts so far: {seen}; monitor: {monitor.health.last_error}"
            )
            time.sleep(0.2)
            seen = counted()
        assert seen == expected
        assert expected["spo2"][1] == 30  # nulls are missing values
        assert expected["temperature"][1] == 0  # v1 records count the default
        assert sum(expected["heart_rate"][0]) == len(records)
    finally:
        monitor.stop_event.set()
        if thread.is_alive():
            thread.join(60)
        engine.dispose()
        admin.delete_topics([t for t in (topic, output) if admin.partitions(t)])
        for permanent in (False, True):
            with contextlib.suppress(Exception):  # best effort: the subject may not exist
                registry.client.delete_subject(subject, permanent=permanent)
