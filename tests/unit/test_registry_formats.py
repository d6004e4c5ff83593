"""Registry formats without a registry: a fake client serves writer schemas by id."""

from __future__ import annotations

import base64
import io
from typing import Any

import fastavro
import orjson
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryError
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from carrara.streams.event_codec import EventDecoder, FeatureSpec, fit_feature_spec
from carrara.streams.event_schema import EventFormat, EventSchema, Feature, FeatureType, Task
from carrara.streams.prediction_record import AvroPredictionEncoder, Prediction
from carrara.streams.registry_formats import check_registered_schema
from carrara.streams.schema_registry import Registry, RegistryUnavailable, frame

V1: dict[str, Any] = {
    "type": "record",
    "name": "E",
    "fields": [
        {"name": "id", "type": "string"},
        {
            "name": "pay",
            "type": {
                "type": "record",
                "name": "Pay",
                "fields": [{"name": "amount", "type": ["null", "double"], "default": None}],
            },
        },
        {"name": "fraud", "type": "boolean"},
    ],
}
V2: dict[str, Any] = {**V1, "fields": [*V1["fields"], {"name": "n", "type": "int", "default": 3}]}
# An incompatible writer: `pay.amount` became a string.
BROKEN: dict[str, Any] = {
    **V1,
    "fields": [
        V1["fields"][0],
        {
            "name": "pay",
            "type": {
                "type": "record",
                "name": "Pay",
                "fields": [{"name": "amount", "type": "string"}],
            },
        },
        V1["fields"][2],
    ],
}


class FakeClient:
    def __init__(self, schemas: dict[int, Schema]) -> None:
        self.schemas = schemas
        self.calls = 0
        self.down = False

    def get_schema(self, schema_id: int) -> Schema:
        self.calls += 1
        if self.down:
            raise ConnectionError("refused")
        if schema_id not in self.schemas:
            raise SchemaRegistryError(404, 40403, "Schema not found")
        return self.schemas[schema_id]


def _registry(client: FakeClient) -> Registry:
    return Registry(client, f"fake://{id(client)}")  # pyright: ignore[reportArgumentType]


def _avro(schema: dict[str, Any], schema_id: int, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return frame(schema_id, out.getvalue())


SCHEMA = EventSchema(
    key_field="id",
    features=(
        Feature("amount", FeatureType.float, path="pay.amount"),
        Feature("n", FeatureType.float, default=3),
    ),
    task=Task.binary,
    label_field="fraud",
    format=EventFormat.avro,
)


def test_avro_records_of_two_versions_and_bad_ones_decode_with_reasons() -> None:
    client = FakeClient(
        {
            1: Schema(orjson.dumps(V1).decode(), "AVRO"),
            2: Schema(orjson.dumps(V2).decode(), "AVRO"),
            3: Schema(orjson.dumps(BROKEN).decode(), "AVRO"),
        }
    )
    values = [
        _avro(V1, 1, {"id": "a", "pay": {"amount": 1.5}, "fraud": True}),
        _avro(V2, 2, {"id": "b", "pay": {"amount": None}, "fraud": False, "n": 7}),
        _avro(BROKEN, 3, {"id": "c", "pay": {"amount": "x"}, "fraud": False}),
        b'{"id": "json"}',
        frame(42, b"\x00"),
        None,
    ]
    decoder = EventDecoder(SCHEMA, registry=_registry(client))
    decoder.add_batch(values, [0] * 6, range(6))
    decoded = decoder.result()
    assert decoded.keys == ["a", "b"]
    assert decoded.numeric[0].tolist() == [1.5, 3.0]  # v1 reads n's default
    assert decoded.numeric[1, 1] == 7.0
    reasons = {s["offset"]: s["reason"] for s in decoded.bad.samples}
    assert "pay.amount" in reasons[2]
    assert "string" in reasons[2]
    assert "no Schema Registry framing" in reasons[3]
    assert reasons[4] == "unknown schema id 42 (not in the Schema Registry)"
    assert "tombstone" in reasons[5]
    # The spec keeps the format, so a scorer decodes the same way.
    spec = fit_feature_spec(decoded)
    assert FeatureSpec.from_json(spec.to_json()).schema == SCHEMA
    # Writer schemas are fetched once per id.
    calls = client.calls
    decoder.add_batch(values[:2], [0, 0], [6, 7])
    assert client.calls == calls


def test_a_rejected_null_is_a_bad_event_and_an_unreachable_registry_raises() -> None:
    client = FakeClient({1: Schema(orjson.dumps(V1).decode(), "AVRO")})
    strict = EventSchema(
        key_field="id",
        features=(Feature("amount", FeatureType.float, path="pay.amount", nulls="reject"),),  # pyright: ignore[reportArgumentType]
        task=Task.binary,
        label_field="fraud",
        format=EventFormat.avro,
    )
    decoder = EventDecoder(strict, training=False, registry=_registry(client))
    decoder.add_batch([_avro(V1, 1, {"id": "a", "pay": {"amount": None}, "fraud": True})], [0], [0])
    assert decoder.result().bad.samples[0]["reason"] == "null or missing at `pay.amount`"
    down = FakeClient({})
    down.down = True
    with pytest.raises(RegistryUnavailable):
        EventDecoder(SCHEMA, registry=_registry(down)).add_batch([frame(9, b"\x00")], [0], [0])


def test_protobuf_reads_presence_and_the_subject_check_names_fields() -> None:
    file = descriptor_pb2.FileDescriptorProto(name="p.proto", package="t", syntax="proto3")
    message = file.message_type.add(name="P")
    message.field.add(name="id", number=1, type=9, label=1)
    message.field.add(name="x", number=2, type=1, label=1, proto3_optional=True, oneof_index=0)
    message.oneof_decl.add(name="_x")
    message.field.add(name="y", number=3, type=8, label=1)
    encoded = base64.b64encode(file.SerializeToString()).decode()
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.P"))
    schema = EventSchema(
        key_field="id",
        features=(Feature("x", FeatureType.float),),
        task=Task.binary,
        label_field="y",
        format=EventFormat.protobuf,
    )
    client = FakeClient({5: Schema(encoded, "PROTOBUF")})
    decoder = EventDecoder(schema, registry=_registry(client))
    values = [
        frame(5, b"\x00" + cls(id="a", x=2.0, y=True).SerializeToString()),
        frame(5, b"\x00" + cls(id="b", y=False).SerializeToString()),
    ]
    decoder.add_batch(values, [0, 0], [0, 1])
    decoded = decoder.result()
    assert decoded.keys == ["a", "b"]
    assert decoded.numeric[0, 0] == 2.0
    assert decoded.numeric[1, 0] != decoded.numeric[1, 0]  # unset optional: missing (NaN)
    wrong = EventSchema(
        key_field="id",
        features=(Feature("y", FeatureType.float), Feature("z", FeatureType.float)),
        task=Task.anomaly,
        format=EventFormat.protobuf,
    )
    mismatches, _ = check_registered_schema(wrong, Schema(encoded, "PROTOBUF"))
    assert [m.field for m in mismatches] == ["y", "z"]


def test_avro_predictions_read_back_with_the_registered_schema() -> None:
    class Registering(FakeClient):
        def register_schema(self, subject: str, schema: Schema) -> int:
            self.schemas[11] = schema
            return 11

    client = Registering({})
    encoder = AvroPredictionEncoder(_registry(client), "out-value")
    raw = encoder(
        Prediction(
            key="k",
            topic="t",
            partition=0,
            offset=3,
            deployment="d",
            revision=1,
            variant="a",
            model="m",
            model_version=2,
            score=0.25,
            label=True,
        )
    )
    assert raw[:5] == frame(11, b"")
    parsed = fastavro.parse_schema(orjson.loads(client.schemas[11].schema_str or ""))
    record = fastavro.schemaless_reader(io.BytesIO(raw[5:]), parsed, None)
    assert record["score"] == 0.25  # pyright: ignore[reportIndexIssue, reportCallIssue, reportArgumentType]
    assert record["label"] is True  # pyright: ignore[reportIndexIssue, reportCallIssue, reportArgumentType]
