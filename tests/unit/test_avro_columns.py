"""The columnar Avro reader gives exactly what fastavro record by record gives (no registry)."""

from __future__ import annotations

import io
import math
import random
from datetime import UTC, date, datetime, timedelta
from typing import Any

import fastavro
import numpy as np
import orjson
import pytest
from confluent_kafka.schema_registry import Schema

from carrara.streams.event_codec import DecodedEvents, EventDecoder
from carrara.streams.event_schema import EventFormat, EventSchema, Feature, FeatureType, Task
from carrara.streams.registry_formats import AvroReader, compile_reader, reader_for
from carrara.streams.schema_registry import Registry, frame

WRITER: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test",
    "fields": [
        {"name": "device", "type": "string"},
        {"name": "raw", "type": "bytes"},
        {"name": "hr", "type": "double"},
        {"name": "spo2", "type": "float"},
        {"name": "alarm", "type": "boolean"},
        {"name": "tag", "type": {"type": "fixed", "name": "Tag", "size": 3}},
        {"name": "steps", "type": "long"},
        {"name": "ward", "type": {"type": "enum", "name": "Ward", "symbols": ["A", "B", "ICU"]}},
        {"name": "again", "type": "Ward"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "temp", "type": ["null", "double"], "default": None},
        {
            "name": "vitals",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Vitals",
                    "fields": [
                        {"name": "bp", "type": "int"},
                        {"name": "rr", "type": ["null", "float", "string"]},
                        {
                            "name": "inner",
                            "type": {
                                "type": "record",
                                "name": "Inner",
                                "fields": [{"name": "x", "type": ["double", "null"]}],
                            },
                        },
                    ],
                },
            ],
        },
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "label", "type": ["null", "boolean"]},
        {"name": "level", "type": "int"},
    ],
}
SCHEMA = EventSchema(
    key_field="device",
    features=(
        Feature("hr", FeatureType.float),
        Feature("spo2", FeatureType.float),
        Feature("alarm", FeatureType.bool),
        Feature("steps", FeatureType.int),
        Feature("ward", FeatureType.category),
        Feature("ward2", FeatureType.string, path="again"),
        Feature("note", FeatureType.category),
        Feature("temp", FeatureType.float),
        Feature("bp", FeatureType.int, path="vitals.bp"),
        Feature("x", FeatureType.float, path="vitals.inner.x"),
        Feature("day", FeatureType.float),
        Feature("gone", FeatureType.float, default=2.5),  # not in the writer: the default
        Feature("gone_cat", FeatureType.category, default="z"),
        Feature("level", FeatureType.category),
    ),
    task=Task.binary,
    label_field="label",
    event_time_field="at",
    format=EventFormat.avro,
)


def _record(rng: random.Random, i: int) -> dict[str, Any]:
    vitals = None
    if rng.random() < 0.8:
        vitals = {
            "bp": rng.randint(-(2**31), 2**31 - 1) if i % 7 == 0 else rng.randint(40, 200),
            "rr": rng.choice([None, rng.random(), "n/a"]),
            "inner": {"x": rng.choice([None, rng.uniform(-1e6, 1e6)])},
        }
    return {
        "device": rng.choice(["d-1", "d-é", "", "x" * rng.randint(60, 300)]),
        "raw": bytes(rng.randrange(256) for _ in range(rng.randint(0, 70))),
        "hr": rng.uniform(-1e300, 1e300) if i % 5 == 0 else rng.random(),
        "spo2": rng.random(),
        "alarm": rng.random() < 0.5,
        "tag": b"abc",
        "steps": rng.choice([0, -1, 1, 63, 64, -65, 2**40, -(2**63), 2**63 - 1]),
        "ward": rng.choice(["A", "B", "ICU"]),
        "again": rng.choice(["A", "B", "ICU"]),
        "note": rng.choice([None, "ok", "ünïcode", "y" * 200]),
        "temp": rng.choice([None, 36.6, -0.0]),
        "vitals": vitals,
        "at": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(milliseconds=rng.randint(0, 10**10)),
        "day": date(2020, 1, 1) + timedelta(days=rng.randint(0, 3000)),
        "label": rng.choice([True, False]),
        "level": rng.randint(-5, 5),
    }


def _framed(writer: dict[str, Any], records: list[dict[str, Any]], schema_id: int) -> list[bytes]:
    parsed = fastavro.parse_schema(writer)
    out = []
    for record in records:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, record)
        out.append(frame(schema_id, buffer.getvalue()))
    return out


def _reader(writer: dict[str, Any], schema: EventSchema = SCHEMA, training: bool = True) -> Any:
    reader = compile_reader(schema, training, 1, Schema(orjson.dumps(writer).decode(), "AVRO"))
    assert isinstance(reader, AvroReader), reader
    return reader


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("training", [True, False])
def test_columns_equal_the_record_by_record_rows(training: bool) -> None:
    rng = random.Random(5)
    values = _framed(WRITER, [_record(rng, i) for i in range(600)], 1)
    reader = _reader(WRITER, training=training)
    assert reader.plan is not None
    indexes = list(range(len(values)))
    rows, good_rows, bad_rows = reader.rows(values, indexes)
    got = reader.columns(values, indexes)
    assert got is not None
    columns, good, bad = got
    assert (good, bad) == (good_rows, bad_rows)
    for j, column in enumerate(columns):
        expected = [row[j] for row in rows]
        if isinstance(column, np.ndarray):  # numeric slots: float64, NaN for null or missing
            assert column.dtype == np.float64
            want = np.array([math.nan if v is None else float(v) for v in expected])
            np.testing.assert_array_equal(column, want)
        else:
            assert all(map(_same, column, expected)), (j, column[:5], expected[:5])


class _Client:
    """Serves writer schemas by id, as the registry client does."""

    def __init__(self, writers: dict[int, dict[str, Any]]) -> None:
        self.schemas = {i: Schema(orjson.dumps(w).decode(), "AVRO") for i, w in writers.items()}

    def get_schema(self, schema_id: int) -> Schema:
        return self.schemas[schema_id]


def _registry(writers: dict[int, dict[str, Any]]) -> Registry:
    client = _Client(writers)
    return Registry(client, f"fake://{id(client)}")  # pyright: ignore[reportArgumentType]


def _decode(
    registry: Registry, values: list[bytes], schema: EventSchema = SCHEMA, training: bool = True
) -> DecodedEvents:
    decoder = EventDecoder(schema, training=training, registry=registry)
    decoder.add_batch(values, [0] * len(values), range(100, 100 + len(values)))
    return decoder.result()


def test_a_decoder_reads_the_same_matrix_either_way() -> None:
    rng = random.Random(9)
    values = _framed(WRITER, [_record(rng, i) for i in range(300)], 1)
    registry = _registry({1: WRITER})
    columnar = _decode(registry, values)
    reader = reader_for(registry, SCHEMA, True, 1)
    assert isinstance(reader, AvroReader)
    assert reader.plan is not None
    reader.plan = None  # the cached reader now reads record by record
    rows = _decode(registry, values)
    np.testing.assert_array_equal(columnar.numeric, rows.numeric)
    assert columnar.keys == rows.keys
    assert columnar.categories == rows.categories
    assert columnar.labels == rows.labels
    assert columnar.event_times is not None
    assert rows.event_times is not None
    np.testing.assert_allclose(columnar.event_times, rows.event_times, rtol=0, atol=1e-3)
    assert columnar.bad.count == rows.bad.count == 0


def test_malformed_records_fall_back_to_the_reader_that_names_them() -> None:
    rng = random.Random(3)
    good = _framed(WRITER, [_record(rng, i) for i in range(20)], 1)
    truncated = good[1][:-4]
    huge_string = frame(1, b"\xfe\xff\xff\xff\x0f")  # a key of 2**31 bytes
    not_utf8 = frame(1, b"\x04\xff\xfe")
    bad_enum = _framed({**WRITER, "fields": WRITER["fields"][:8]}, [_record(rng, 0)], 1)[0]
    bad_enum = bad_enum[:-1] + b"\x10"  # ward's symbol 8 of 3
    registry = _registry({1: WRITER})
    reader = reader_for(registry, SCHEMA, True, 1)
    assert isinstance(reader, AvroReader)
    for broken in (truncated, huge_string, not_utf8, bad_enum):
        values = [good[0], broken, good[4]]
        assert reader.columns(values, [0, 1, 2]) is None
        # Last in the batch, a record cut short reads on into the padding, never past the buffer.
        assert reader.columns([good[0], good[4], broken], [0, 1, 2]) is None
        assert reader.columns([frame(1, b"\x02a")], [0]) is None
        decoded = _decode(registry, values)
        assert decoded.offsets.tolist() == [100, 102]
        assert [s["offset"] for s in decoded.bad.samples] == [101]
        assert "writer schema 1" in decoded.bad.samples[0]["reason"]


def test_trailing_bytes_are_ignored_as_fastavro_does() -> None:
    rng = random.Random(4)
    values = _framed(WRITER, [_record(rng, i) for i in range(3)], 1)
    values[1] += b"\x00\x01\x02"
    reader = _reader(WRITER)
    got = reader.columns(values, [0, 1, 2])
    assert got is not None
    rows, _, _ = reader.rows(values, [0, 1, 2])
    assert got[0][0] == [row[0] for row in rows]


def test_a_required_null_is_bad_and_unreadable_schemas_have_no_plan() -> None:
    writer = {
        "type": "record",
        "name": "E",
        "fields": [
            {"name": "id", "type": ["null", "long"]},
            {"name": "f", "type": "double"},
            {"name": "ok", "type": "boolean"},
        ],
    }
    schema = EventSchema(
        key_field="id",
        features=(Feature("f", FeatureType.float),),
        task=Task.binary,
        label_field="ok",
        format=EventFormat.avro,
    )
    values = _framed(
        writer, [{"id": 7, "f": 1.0, "ok": True}, {"id": None, "f": 2.0, "ok": False}], 1
    )
    reader = _reader(writer, schema)
    got = reader.columns(values, [0, 1])
    assert got is not None
    columns, good, bad = got
    assert good == [0]
    assert bad == [(1, "null or missing at `id`")]
    assert columns[0] == [7]
    arrays = {
        **writer,
        "fields": [*writer["fields"], {"name": "xs", "type": {"type": "array", "items": "int"}}],
    }
    assert _reader(arrays, schema).plan is None
    maps = {
        **writer,
        "fields": [*writer["fields"], {"name": "m", "type": {"type": "map", "values": "int"}}],
    }
    assert _reader(maps, schema).plan is None


def test_two_writer_versions_in_one_batch_keep_the_batch_order() -> None:
    v1: dict[str, Any] = {
        "type": "record",
        "name": "E",
        "fields": [{"name": "id", "type": "string"}, {"name": "f", "type": "double"}],
    }
    v2 = {**v1, "fields": [*v1["fields"], {"name": "g", "type": "double", "default": 1.5}]}
    schema = EventSchema(
        key_field="id",
        features=(Feature("f", FeatureType.float), Feature("g", FeatureType.float, default=1.5)),
        task=Task.anomaly,
        format=EventFormat.avro,
    )
    values = []
    for i in range(10):
        if i % 3:
            values += _framed(v1, [{"id": f"k{i}", "f": float(i)}], 1)
        else:
            values += _framed(v2, [{"id": f"k{i}", "f": float(i), "g": -float(i)}], 2)
    decoded = _decode(_registry({1: v1, 2: v2}), values, schema, training=False)
    assert decoded.keys == [f"k{i}" for i in range(10)]
    assert decoded.offsets.tolist() == list(range(100, 110))
    assert decoded.numeric[:, 0].tolist() == [float(i) for i in range(10)]
    assert decoded.numeric[:, 1].tolist() == [-float(i) if i % 3 == 0 else 1.5 for i in range(10)]


def test_random_bytes_never_raise_and_agree_with_fastavro_when_read() -> None:
    rng = random.Random(11)
    real = _framed(WRITER, [_record(rng, i) for i in range(50)], 1)
    reader = _reader(WRITER)
    read = 0
    for _ in range(400):
        if rng.random() < 0.5:  # a real record with a few bytes flipped or cut
            value = bytearray(rng.choice(real))
            for _ in range(rng.randint(1, 3)):
                value[rng.randrange(5, len(value))] = rng.randrange(256)
            payload = bytes(value[: rng.randint(6, len(value))])
        else:
            payload = frame(1, bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))))
        got = reader.columns([payload], [0])
        if got is None:
            continue
        read += 1
        rows, good, _ = reader.rows([payload], [0])
        assert good == got[1]
        for j, column in enumerate(got[0]):
            want = [row[j] for row in rows]
            if isinstance(column, np.ndarray):
                want = [math.nan if v is None else float(v) for v in want]
                np.testing.assert_array_equal(column, np.array(want, dtype=np.float64))
            else:
                assert all(map(_same, column, want))
    assert read > 0  # some corrupted records still decode (e.g. a flipped double)
