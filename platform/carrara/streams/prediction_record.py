"""The wire formats scorers write: prediction records and dead letters.

A prediction record is one JSON object per scored input event (and one more per shadow variant
that scored it), keyed by the entity key, with the essentials repeated as headers so consumers can
route without parsing. A dead letter is the input record unchanged (key, value, headers) plus
headers saying what went wrong and where the event came from.
"""

from __future__ import annotations

from typing import Any

import msgspec

from carrara.streams.consumed import Headers

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
