"""The wire formats scorers write: prediction records and dead letters.

A prediction record is one JSON object per scored input event (and one more per shadow variant
that scored it), keyed by the entity key, with the essentials repeated as headers so consumers can
route without parsing. A dead letter is the input record unchanged (key, value, headers) plus
headers saying what went wrong and where the event came from.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import fastavro
import msgspec
import orjson
from confluent_kafka.schema_registry import Schema

from carrara.streams.consumed import Headers
from carrara.streams.schema_registry import Registry, default_registry, frame

H_DEPLOYMENT = "carrara-deployment"
H_REVISION = "carrara-revision"
H_VARIANT = "carrara-variant"
H_MODEL = "carrara-model"
H_SHADOW = "carrara-shadow"
H_SOURCE = "carrara-source"  # topic/partition/offset

H_ERROR_CLASS = "carrara-error-class"
H_ERROR_MESSAGE = "carrara-error-message"
H_SOURCE_TOPIC = "carrara-source-topic"
H_SOURCE_PARTITION = "carrara-source-partition"
H_SOURCE_OFFSET = "carrara-source-offset"

# Error classes a dead letter can carry.
UNDECODABLE = "undecodable"  # not JSON / not an object
INVALID_EVENT = "invalid-event"  # missing or mistyped features, missing key field
OVERSIZED = "oversized"  # larger than the scorer's max event size
MODEL_ERROR = "model-error"  # the model raised on this event (isolated by bisection)


class Prediction(msgspec.Struct, kw_only=True, omit_defaults=True):
    key: str | None
    topic: str
    partition: int
    offset: int
    deployment: str
    revision: int
    variant: str
    model: str
    model_version: int
    shadow: bool = False
    score: float | list[float] | None = None
    label: Any = None
    latency_ms: float = 0.0  # in-process: from the batch's start to this variant's scores
    scored_at_ms: int = 0
    # The input record's Kafka timestamp (epoch ms): end-to-end latency is the prediction record's
    # own timestamp minus this. Omitted when 0 (unknown, or written by an older scorer).
    input_ms: int = 0
    # The model's input vector by column (`include_features: true` deployments only): the raw
    # columns as encoded for the model and the feature set's `sql.<name>` columns; None = missing.
    features: dict[str, float | None] | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Prediction)


def encode_prediction(prediction: Prediction) -> bytes:
    return _encoder.encode(prediction)


def decode_prediction(raw: bytes) -> Prediction:
    return _decoder.decode(raw)


def prediction_headers(prediction: Prediction) -> Headers:
    return [
        (H_DEPLOYMENT, prediction.deployment.encode()),
        (H_REVISION, str(prediction.revision).encode()),
        (H_VARIANT, prediction.variant.encode()),
        (H_MODEL, f"{prediction.model}/{prediction.model_version}".encode()),
        (H_SHADOW, b"true" if prediction.shadow else b"false"),
        (H_SOURCE, f"{prediction.topic}/{prediction.partition}/{prediction.offset}".encode()),
    ]


def batch_headers(
    deployment: str, revision: int, variant: str, model: str, shadow: bool
) -> Headers:
    """The headers every prediction of one variant in one batch shares (built once per batch)."""
    return [
        (H_DEPLOYMENT, deployment.encode()),
        (H_REVISION, str(revision).encode()),
        (H_VARIANT, variant.encode()),
        (H_MODEL, model.encode()),
        (H_SHADOW, b"true" if shadow else b"false"),
    ]


def source_header(topic: bytes, partition: int, offset: int) -> tuple[str, bytes]:
    """Where the scored event came from: `topic/partition/offset`."""
    return (H_SOURCE, b"%s/%d/%d" % (topic, partition, offset))


def dead_letter_headers(
    original: Headers | None,
    *,
    error_class: str,
    message: str,
    deployment: str,
    topic: str,
    partition: int,
    offset: int,
) -> Headers:
    """The original headers plus the reason and the source position of the event."""
    return [
        *(original or []),
        (H_ERROR_CLASS, error_class.encode()),
        (H_ERROR_MESSAGE, message[:1000].encode("utf-8", "replace")),
        (H_DEPLOYMENT, deployment.encode()),
        (H_SOURCE_TOPIC, topic.encode()),
        (H_SOURCE_PARTITION, str(partition).encode()),
        (H_SOURCE_OFFSET, str(offset).encode()),
    ]


# --- Avro output (`output_format: avro`) ------------------------------------------------------

# The prediction record in Avro: the JSON record's fields, in the same order. Registered under
# `<output topic>-value`; records are framed with its id (Confluent wire format), so consumers
# read them with their usual deserializers (confluent-kafka's AvroDeserializer, Kafka Connect...).
PREDICTION_AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Prediction",
    "namespace": "io.carrara",
    "doc": "One prediction of a Carrara deployment for one input event.",
    "fields": [
        {"name": "key", "type": ["null", "string"], "default": None},
        {"name": "topic", "type": "string"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
        {"name": "deployment", "type": "string"},
        {"name": "revision", "type": "int"},
        {"name": "variant", "type": "string"},
        {"name": "model", "type": "string"},
        {"name": "model_version", "type": "int"},
        {"name": "shadow", "type": "boolean", "default": False},
        {
            "name": "score",
            "type": ["null", "double", {"type": "array", "items": "double"}],
            "default": None,
        },
        {"name": "label", "type": ["null", "boolean", "long", "double", "string"], "default": None},
        {"name": "latency_ms", "type": "double", "default": 0.0},
        {"name": "scored_at_ms", "type": "long", "default": 0},
        {"name": "input_ms", "type": "long", "default": 0},
        {
            "name": "features",
            "type": ["null", {"type": "map", "values": ["null", "double"]}],
            "default": None,
        },
    ],
}
_FIELDS = tuple(f["name"] for f in PREDICTION_AVRO_SCHEMA["fields"])


class AvroPredictionEncoder:
    """Predictions as Avro records framed with the registered prediction schema's id."""

    def __init__(self, registry: Registry, subject: str) -> None:
        self.subject = subject
        self.schema_id = registry.register(
            subject, Schema(orjson.dumps(PREDICTION_AVRO_SCHEMA).decode(), "AVRO")
        )
        self._parsed = fastavro.parse_schema(PREDICTION_AVRO_SCHEMA)
        self._header = frame(self.schema_id, b"")

    def __call__(self, prediction: Prediction) -> bytes:
        record = {name: getattr(prediction, name) for name in _FIELDS}
        label = record["label"]
        if label is not None and not isinstance(label, (bool, int, float, str)):
            record["label"] = str(label)
        out = io.BytesIO()
        out.write(self._header)
        fastavro.schemaless_writer(out, self._parsed, record)
        return out.getvalue()


_avro_encoders: dict[tuple[str, str], AvroPredictionEncoder] = {}
_avro_lock = threading.Lock()


def avro_prediction_encoder(
    output_topic: str, registry: Registry | None = None
) -> AvroPredictionEncoder:
    """The Avro encoder of `output_topic` (the schema registered once per process and topic);
    RegistryUnavailable when the registry does not answer (the scorer retries the batch)."""
    registry = registry or default_registry()
    key = (registry.url, output_topic)
    found = _avro_encoders.get(key)
    if found is None:
        found = AvroPredictionEncoder(registry, f"{output_topic}-value")
        with _avro_lock:
            _avro_encoders[key] = found
    return found


def prediction_encoder(output_format: str, output_topic: str) -> Callable[[Prediction], bytes]:
    """How a deployment's predictions are encoded: JSON, or Avro through the registry."""
    if output_format == "avro":
        return avro_prediction_encoder(output_topic)
    return encode_prediction
