"""Avro and Protobuf events through the real Schema Registry (the stack's Apicurio) and Kafka.

Datasets are checked against their subject's latest schema (422 naming the field); a snapshot
spanning Avro schema v1 and v2 (a field added with a default) is replayed and trains on every
event; a scorer process serves an Avro and a Protobuf deployment while the producer moves from v1
to v2, answers every offset, dead-letters records without framing or with an unknown id (with the
reason), and writes Avro predictions that confluent-kafka's AvroDeserializer reads.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import httpx
import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastapi.testclient import TestClient
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from carrara.settings import Settings
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, encode_spec
from carrara.streams.event_codec import EventDecoder, fit_feature_spec
from carrara.streams.prediction_record import H_ERROR_CLASS, H_ERROR_MESSAGE, decode_prediction
from carrara.streams.replay import replay_snapshot
from carrara.streams.schema_registry import Registry, frame
from carrara.streams.topics import TopicAdmin
from carrara.training.algorithms import validate_params
from carrara.training.mlflow_logging import Lineage, log_and_register
from carrara.training.onnx_export import export_onnx
from carrara.training.trainers import train
from tests.integration.conftest import ROOT, RUN_ID

VITALS_V1: dict[str, Any] = {
    "type": "record",
    "name": "Vitals",
    "namespace": "test.carrara",
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
# v2 adds a field with a default: BACKWARD compatible, and v1 records read the default.
VITALS_V2: dict[str, Any] = {
    **VITALS_V1,
    "fields": [*VITALS_V1["fields"], {"name": "temperature", "type": "double", "default": 36.6}],
}


def _vital(i: int, v2: bool) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    heart = float(rng.normal(80, 15))
    record = {
        "patient_id": f"p-{i % 50}",
        "vitals": {"heart_rate": heart, "spo2": None if i % 10 == 0 else float(rng.normal(96, 2))},
        "ward": "ABC"[i % 3],
        "critical": heart > 95,
    }
    if v2:
        record["temperature"] = float(rng.normal(37.5 if heart > 95 else 36.8, 0.3))
    return record


def _avro(schema: dict[str, Any], schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return frame(schema_id, out.getvalue())


def _proto_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="payments.proto", package="test.carrara", syntax="proto3"
    )
    message = file.message_type.add(name="Payment")
    string, double, boolean = (
        descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
        descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    )
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    message.field.add(name="card_id", number=1, type=string, label=optional)
    message.field.add(name="amount", number=2, type=double, label=optional)
    message.field.add(name="velocity", number=3, type=double, label=optional)
    message.field.add(name="fraud", number=4, type=boolean, label=optional)
    return file


@pytest.fixture(scope="module")
def registry(stack_settings: Settings) -> Registry:
    url = stack_settings.schema_registry_url
    try:
        httpx.get(f"{url}/subjects", timeout=3).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"the Schema Registry at {url} is not running (carrara stack up): {exc}")
    return Registry(SchemaRegistryClient({"url": url}), url)


def _produce(settings: Settings, topic: str, values: list[bytes], keys: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for key, value in zip(keys, values, strict=True):
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def _read(settings: Settings, topic: str, expected: int, timeout: float = 90) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(records) < expected and time.monotonic() < deadline:
        records.extend(m for m in consumer.consume(1000, timeout=0.5) if m.error() is None)
    consumer.close()
    return records


def _train_and_register(settings: Settings, name: str, schema: dict[str, Any], decoded: Any) -> int:
    spec = fit_feature_spec(decoded)
    x, y = spec.transform(decoded), spec.encode_labels(decoded)
    assert y is not None
    params = validate_params("logistic_regression", "binary", {})
    model = train("logistic_regression", "binary", params, x, y)
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage(name, 1, "t", [], decoded.rows, 0),
        algorithm="logistic_regression",
        params=params,
        metrics={},
        trained=model,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=x[:50],
        holdout_y=y[:50],
        onnx=export_onnx(model, x[:50]),
    )
    assert spec.schema.format == schema["format"]
    return logged.version


def _replay(settings: Settings, topic: str, offsets: list[dict[str, int]], schema: Any) -> Any:
    decoder = EventDecoder(schema)
    for batch in replay_snapshot(settings.kafka_bootstrap, topic, offsets):
        decoder.add_batch(batch.values, batch.partitions, batch.offsets)
    return decoder.result()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def topics(stack_settings: Settings) -> Iterator[dict[str, str]]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    names = {
        name: f"test-{RUN_ID}-registry-{name}-{uuid.uuid4().hex[:6]}"
        for name in ("vitals", "vitals-out", "payments", "payments-out", "deployments", "status")
    }
    for name in ("vitals", "vitals-out", "payments", "payments-out"):
        admin.create_topic(names[name], partitions=2)
    admin.ensure_compacted_topic(names["deployments"])
    admin.ensure_compacted_topic(names["status"])
    yield names
    dead = [f"{names[n]}.dead-letters" for n in ("vitals", "payments")]
    # A dead-letter topic exists only once a scorer wrote to it.
    admin.delete_topics([t for t in [*names.values(), *dead] if admin.partitions(t)])


def test_avro_and_protobuf_datasets_train_and_score_across_a_schema_change(
    client: TestClient,
    admin_headers: dict[str, str],
    stack_settings: Settings,
    registry: Registry,
    topics: dict[str, str],
) -> None:
    settings = stack_settings
    vitals, payments = topics["vitals"], topics["payments"]
    vitals_subject = f"{vitals}-value"
    v1 = registry.register(vitals_subject, Schema(orjson.dumps(VITALS_V1).decode(), "AVRO"))

    # The dataset is checked against the subject's latest schema, not a sample of events.
    body: dict[str, Any] = {
        "name": f"vitals-{uuid.uuid4().hex[:6]}",
        "topic": vitals,
        "format": "avro",
        "key_field": "patient_id",
        "label_field": "critical",
        "task": "binary",
        "features": [
            {"name": "heart_rate", "type": "float", "path": "vitals.heart_rate"},
            {"name": "spo2", "type": "float", "path": "vitals.spo2"},
            {"name": "ward", "type": "category"},
            {"name": "temperature", "type": "float"},
        ],
    }
    missing = client.post("/api/v1/datasets", json=body, headers=admin_headers)
    assert missing.status_code == 422, missing.text
    assert [e["field"] for e in missing.json()["errors"]] == ["temperature"]
    assert "no field `temperature`" in missing.json()["errors"][0]["message"]
    mistyped = {
        **body,
        "features": [*body["features"][:3], {"name": "x", "type": "float", "path": "ward"}],
    }
    wrong = client.post("/api/v1/datasets", json=mistyped, headers=admin_headers)
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["errors"][0]["field"] == "ward"
    assert "enum" in wrong.json()["errors"][0]["message"]

    v2 = registry.register(vitals_subject, Schema(orjson.dumps(VITALS_V2).decode(), "AVRO"))
    assert v2 != v1
    created = client.post("/api/v1/datasets", json=body, headers=admin_headers)
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["subject"] == vitals_subject
    assert dataset["subject_version"] == 2
    assert dataset["features"][3]["default"] == 36.6  # the reader schema's default, recorded

    # A snapshot spanning v1 and v2 trains on every one of its events.
    n = 400
    values = [_avro(VITALS_V1, v1, _vital(i, False)) for i in range(n // 2)]
    values += [_avro(VITALS_V2, v2, _vital(i, True)) for i in range(n // 2, n)]
    _produce(settings, vitals, values, [f"p-{i % 50}".encode() for i in range(n)])
    version = client.post(
        f"/api/v1/datasets/{body['name']}/versions", json={}, headers=admin_headers
    )
    assert version.status_code == 201, version.text
    assert version.json()["event_count"] == n
    job_schema = {
        k: dataset[k] for k in ("key_field", "event_time_field", "label_field", "task", "features")
    } | {"format": "avro", "subject": vitals_subject}
    decoded = _replay(settings, vitals, version.json()["offsets"], job_schema)
    assert decoded.rows == n
    assert decoded.bad.count == 0
    temperature = decoded.numeric[:, 2]
    assert np.count_nonzero(temperature == 36.6) == n // 2  # v1 records read the default
    vitals_model = f"registry-vitals-{RUN_ID}"
    vitals_version = _train_and_register(settings, vitals_model, job_schema, decoded)

    # Protobuf: a descriptor registered as confluent-kafka's ProtobufSerializer registers it.
    file = _proto_file()
    pb_id = registry.register(
        f"{payments}-value",
        Schema(base64.b64encode(file.SerializeToString()).decode(), "PROTOBUF"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    payment = message_factory.GetMessageClass(pool.FindMessageTypeByName("test.carrara.Payment"))

    def pay(i: int) -> bytes:
        rng = np.random.default_rng(10_000 + i)
        amount, velocity = float(rng.lognormal(3, 1)), float(rng.poisson(2))
        fraud = amount * 0.02 + velocity * 0.5 + rng.normal() > 2.5
        message = payment(card_id=f"c-{i}", amount=amount, velocity=velocity, fraud=fraud)
        return frame(pb_id, b"\x00" + message.SerializeToString())

    pay_body = {
        "name": f"payments-{uuid.uuid4().hex[:6]}",
        "topic": payments,
        "format": "protobuf",
        "key_field": "card_id",
        "label_field": "fraud",
        "task": "binary",
        "features": [{"name": "amount", "type": "float"}, {"name": "velocity", "type": "float"}],
    }
    pay_created = client.post("/api/v1/datasets", json=pay_body, headers=admin_headers)
    assert pay_created.status_code == 201, pay_created.text
    _produce(settings, payments, [pay(i) for i in range(400)], [b"k"] * 400)
    pay_version = client.post(
        f"/api/v1/datasets/{pay_body['name']}/versions", json={}, headers=admin_headers
    )
    pay_schema = {
        k: pay_created.json()[k]
        for k in ("key_field", "event_time_field", "label_field", "task", "features")
    } | {"format": "protobuf", "subject": f"{payments}-value"}
    pay_decoded = _replay(settings, payments, pay_version.json()["offsets"], pay_schema)
    assert pay_decoded.rows == 400
    assert pay_decoded.bad.count == 0
    pay_model = f"registry-payments-{RUN_ID}"
    pay_version_number = _train_and_register(settings, pay_model, pay_schema, pay_decoded)

    # One scorer process serves both deployments: Avro predictions for vitals, JSON for payments.
    pool_name = f"pool-{uuid.uuid4().hex[:6]}"
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for name, source, output, key_field, model, model_version, out_format in (
        (
            "vitals",
            vitals,
            topics["vitals-out"],
            "patient_id",
            vitals_model,
            vitals_version,
            "avro",
        ),
        (
            "payments",
            payments,
            topics["payments-out"],
            "card_id",
            pay_model,
            pay_version_number,
            "json",
        ),
    ):
        spec = DeploymentSpec(
            name=name,
            revision=1,
            salt="s",
            published_at=datetime.now(UTC),
            input_topic=source,
            output_topic=output,
            key_field=key_field,
            pool=pool_name,
            output_format=out_format,  # pyright: ignore[reportArgumentType]
            variants=(
                VariantSpec(name="a", model_name=model, model_version=model_version, weight=100),
            ),
        )
        producer.produce(topics["deployments"], key=name, value=encode_spec(spec))
    assert producer.flush(10) == 0
    port = _free_port()
    log = ROOT / ".carrara" / "logs" / f"test-registry-scorer-{RUN_ID}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        scorer = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "carrara-scorer"),
                "--pool",
                pool_name,
                "--instance-id",
                f"registry-{RUN_ID}",
                "--metrics-port",
                str(port),
            ],
            cwd=ROOT,
            env={
                **os.environ,
                "CARRARA_DEPLOYMENTS_TOPIC": topics["deployments"],
                "CARRARA_SCORER_STATUS_TOPIC": topics["status"],
                "CARRARA_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert scorer.poll() is None, f"the scorer exited; see {log}"
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200 and len(ready.json()["deployments"]) == 2:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the scorer is not ready; see {log}"
            time.sleep(0.3)

        # While it serves, the producer moves from v1 to v2, and two records it cannot read come.
        live = [_avro(VITALS_V1, v1, _vital(i, False)) for i in range(n, n + 100)]
        live += [_avro(VITALS_V2, v2, _vital(i, True)) for i in range(n + 100, n + 200)]
        bad = [orjson.dumps({"patient_id": "x"}), frame(987_654, b"\x02ab")]
        _produce(settings, vitals, [*live, *bad], [b"p"] * (len(live) + 2))
        answered = len(live)  # a new deployment starts at the end of its input topic
        records = _read(settings, topics["vitals-out"], answered)
        deserialize = AvroDeserializer(SchemaRegistryClient({"url": settings.schema_registry_url}))
        context = SerializationContext(topics["vitals-out"], MessageField.VALUE)
        predictions = [deserialize(m.value(), context) for m in records]
        assert len(predictions) == answered
        assert len({(p["partition"], p["offset"]) for p in predictions}) == answered  # every offset
        assert {p["deployment"] for p in predictions} == {"vitals"}
        assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
        dead = _read(settings, f"{vitals}.dead-letters", 2)
        reasons = sorted(dict(m.headers())[H_ERROR_MESSAGE].decode() for m in dead)
        assert len(reasons) == 2
        assert "no Schema Registry framing" in reasons[0]
        assert "unknown schema id 987654" in reasons[1]
        # Bytes that cannot be read at all are `undecodable`, not invalid events.
        assert {dict(m.headers())[H_ERROR_CLASS] for m in dead} == {b"undecodable"}
        assert sorted(m.value() for m in dead) == sorted(bad)  # the original bytes

        _produce(settings, payments, [pay(i) for i in range(400, 500)], [b"k"] * 100)
        pay_records = _read(settings, topics["payments-out"], 100)
        pay = [decode_prediction(m.value()) for m in pay_records]
        assert len({(p.partition, p.offset) for p in pay}) == 100
        assert len(pay_records) == 100
        assert {p.deployment for p in pay} == {"payments"}
    finally:
        os.killpg(scorer.pid, signal.SIGTERM)
        scorer.wait(timeout=60)
