"""Counting the monitor's records that need no join: predictions (count, score, in-process and
end-to-end latency histograms, and the pending row awaiting an outcome), dead letters, and input
values binned by the champion's training profile for drift (JSON objects read by feature name;
Avro, Protobuf and JSON Schema records decoded a batch at a time with the scorers' decoder)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Message

from carrara.monitoring.aggregates import (
    Deltas,
    as_float,
    end_to_end_bin,
    latency_bin,
    minute,
    score_bin,
)
from carrara.monitoring.statistics import bin_counts
from carrara.monitoring.watched import Watched
from carrara.streams.event_codec import NUMERIC_TYPES, EventDecoder
from carrara.streams.prediction_record import H_DEPLOYMENT, decode_prediction
from carrara.streams.schema_registry import Registry

# Input values of one batch: (deployment, feature, minute) -> the values read.
Inputs = defaultdict[tuple[str, str, datetime], list[Any]]


# Registry-framed input records of one batch, per deployment (see `decode_framed`).
Framed = defaultdict[str, list[Message]]


def new_inputs() -> Inputs:
    return defaultdict(list)


def new_framed() -> Framed:
    return defaultdict(list)


def count_prediction(
    message: Message, watched: dict[str, Watched], deltas: Deltas, pending: list[dict[str, Any]]
) -> None:
    """Count a prediction; keep it in `pending` (rows to insert) if its outcome will be joined."""
    try:
        p = decode_prediction(message.value() or b"")
    except Exception:  # not a prediction record (e.g. another producer on the topic)
        return
    w = watched.get(p.deployment)
    if w is None or w.output_topic != message.topic():
        return
    written_ms = message.timestamp()[1]
    bucket = minute(p.scored_at_ms or written_ms)
    d = deltas.variant(p.deployment, p.variant, bucket)
    d.shadow = p.shadow
    d.model_version = p.model_version
    d.predictions += 1
    score = p.score if isinstance(p.score, float | int) else None
    if isinstance(p.score, list) and p.score:
        score = max(p.score)
    if score is not None and math.isfinite(score):
        d.score_sum += score
        d.score_histogram[score_bin(score)] += 1
    d.latency_histogram[latency_bin(p.latency_ms)] += 1
    # End to end: input record written -> prediction record written (both Kafka timestamps).
    # Unknown for records of older scorers (no input_ms) and records without a timestamp; a
    # negative difference (clocks of different producers) is not a latency.
    if p.input_ms > 0 and written_ms > 0 and written_ms >= p.input_ms:
        d.end_to_end_histogram[end_to_end_bin(written_ms - p.input_ms)] += 1
    if w.outcomes_topic:
        pending.append(
            {
                "deployment": p.deployment,
                "source_topic": p.topic,
                "source_partition": p.partition,
                "source_offset": p.offset,
                "variant": p.variant,
                "entity_key": p.key,
                "shadow": p.shadow,
                "model_version": p.model_version,
                "score": p.score,
                "label": p.label,
                "predicted_at": datetime.fromtimestamp((p.scored_at_ms or 0) / 1000, tz=UTC),
            }
        )


def count_dead_letter(message: Message, name: str, deltas: Deltas) -> None:
    """Count a dead letter if deployment `name` sent it (its topic may be shared)."""
    sender = dict(message.headers() or []).get(H_DEPLOYMENT)
    if isinstance(sender, bytes):
        sender = sender.decode(errors="replace")
    if sender != name:
        return
    deltas.variant(name, "-", minute(message.timestamp()[1])).dead_letters += 1


def collect_input(
    message: Message,
    names: set[str],
    watched: dict[str, Watched],
    inputs: Inputs,
    framed: Framed,
) -> None:
    """Keep the profiled features' values of an input event, per deployment and minute.

    A deployment whose inputs are registry-framed keeps the record in `framed`, decoded with the
    batch's others by `decode_framed`.
    """
    event: Any = None
    for name in names:
        if watched[name].input_schema is not None:
            framed[name].append(message)
            continue
        if event is None:
            try:
                event = orjson.loads(message.value() or b"")
            except orjson.JSONDecodeError:
                event = False
        if not isinstance(event, dict):
            continue
        bucket = minute(message.timestamp()[1])
        for feature in watched[name].profiles:
            inputs[(name, feature, bucket)].append(event.get(feature))


def decode_framed(
    framed: Framed, watched: dict[str, Watched], registry: Registry, inputs: Inputs
) -> None:
    """The profiled features of registry-framed inputs (Avro, Protobuf, JSON Schema), each
    deployment's records decoded together as its scorers decode them (each with its writer
    schema). Records that cannot be read are not counted (the scorer dead-letters them); a
    registry that does not answer raises `RegistryUnavailable` (the batch is read again)."""
    for name, messages in framed.items():
        w = watched[name]
        assert w.input_schema is not None
        decoder = EventDecoder(w.input_schema, training=False, registry=registry)
        n = len(messages)
        decoder.add_batch([m.value() for m in messages], [0] * n, range(n))
        decoded = decoder.result()
        numeric = [f.name for f in decoded.schema.features if f.type in NUMERIC_TYPES]
        buckets = [minute(messages[i].timestamp()[1]) for i in decoded.offsets.tolist()]
        for feature in w.profiles:
            if feature in numeric:
                values: list[Any] = decoded.numeric[:, numeric.index(feature)].tolist()
            elif feature in decoded.categories:
                values = decoded.categories[feature]
            else:
                continue
            for bucket, value in zip(buckets, values, strict=True):
                inputs[(name, feature, bucket)].append(value)


def count_inputs(inputs: Inputs, watched: dict[str, Watched], deltas: Deltas) -> None:
    """Count the batch's input values in the training profile's bins, per feature."""
    for (name, feature, bucket), values in inputs.items():
        w = watched[name]
        profile = w.profiles[feature]
        if w.profile_version_id is None:
            continue
        if profile.get("kind") != "category":
            values = [as_float(v) if v is not None else math.nan for v in values]
            values = [math.nan if v is None else v for v in values]
        counts = list(bin_counts(profile, values))
        drift = deltas.drift_for(name, feature, bucket, w.profile_version_id, len(counts))
        drift.counts = [a + b for a, b in zip(drift.counts, counts, strict=True)]
        drift.missing += len(values) - sum(counts)
