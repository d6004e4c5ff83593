"""Scoring one micro-batch: decode, route, predict per variant, and build the output records.

Pure with respect to Kafka: it takes input events and returns the records to produce, so the
delivery loop (exactly-once or at-least-once) stays separate and this part is unit-testable.

The hot path is columnar: the batch arrives as columns (`InputBatch`, one pass over the consumed
messages), events are decoded once per distinct schema with their batch index as the position,
variant assignment is one vectorised lookup per batch (skipped for a single 100% variant), scores
stay arrays, and the parts of each output record that are the same for the whole batch (the
deployment, revision, variant, model and topic headers) are built once per variant.

Per batch: oversized events are dead-lettered first; the rest are decoded once per distinct event
schema with the typed codec; undecodable or invalid events are dead-lettered with the reason; each
remaining event is routed by its entity key (or its offset when keyless) to one live variant; every
live variant scores its rows in one call; a model that raises is bisected down to the events that
make it raise, which are dead-lettered while the rest are scored; shadow variants score their
sample and their results are written marked `shadow`.

Why one module of ~500 lines: it is the scorer's hot path for one batch (decode, route, score,
encode), kept together so it is profiled and read as one unit; its parts are module-level
functions with no state of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import numpy as np
from confluent_kafka import Message

from carrara.features.plan import FeaturePlan, decoded_fields
from carrara.scoring.feature_state import FeatureStore, feature_plan
from carrara.scoring.splitter import Splitter, routing_key
from carrara.streams.consumed import Headers, headers
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec
from carrara.streams.event_codec import DecodedEvents, EventDecoder, FeatureSpec
from carrara.streams.prediction_record import (
    H_SOURCE,
    INVALID_EVENT,
    MODEL_ERROR,
    OVERSIZED,
    UNDECODABLE,
    Prediction,
    batch_headers,
    dead_letter_headers,
    prediction_encoder,
)


class ScoringModel(Protocol):
    """What the scorer needs of a loaded model version (see scoring.model_runtime)."""

    model_name: str
    version: int

    def scores(self, features: np.ndarray) -> np.ndarray: ...

    def labels(self, scores: np.ndarray) -> list[Any]: ...


@dataclass(frozen=True)
class InputEvent:
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int = 0


class OutputRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int = -1  # -1: the producer's partitioner; set for a feature-set changelog


@dataclass(frozen=True)
class InputBatch:
    """A micro-batch as columns; `headers_of(i)` is asked only for the events dead-lettered."""

    topic: str
    keys: list[bytes | None]
    values: list[bytes | None]
    partitions: list[int]
    offsets: list[int]
    timestamps: list[int]  # record timestamps, epoch ms (end-to-end latency is measured from them)
    headers_of: Callable[[int], Headers | None]

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def of_messages(cls, topic: str, messages: Sequence[Message]) -> InputBatch:
        """One pass over consumed messages (all of `topic`)."""
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        partitions: list[int] = []
        offsets: list[int] = []
        timestamps: list[int] = []
        for m in messages:
            keys.append(m.key())
            values.append(m.value())
            partitions.append(m.partition())  # pyright: ignore[reportArgumentType] - consumed
            offsets.append(m.offset())  # pyright: ignore[reportArgumentType]
            timestamps.append(m.timestamp()[1])
        return cls(
            topic, keys, values, partitions, offsets, timestamps, lambda i: headers(messages[i])
        )

    @classmethod
    def of_events(cls, events: Sequence[InputEvent]) -> InputBatch:
        return cls(
            events[0].topic if events else "",
            [e.key for e in events],
            [e.value for e in events],
            [e.partition for e in events],
            [e.offset for e in events],
            [e.timestamp_ms for e in events],
            lambda i: events[i].headers,
        )


@dataclass(frozen=True)
class VariantRuntime:
    spec: VariantSpec
    model: ScoringModel
    feature_spec: FeatureSpec
    # The feature set the model was trained with (computed before the model; None: raw fields).
    plan: FeaturePlan | None = None

    @property
    def decoding(self) -> tuple[Any, bool]:
        """What its events are decoded with: the schema, and whether the event time is read."""
        return (self.feature_spec.schema, self.plan is not None)


@dataclass(frozen=True)
class ServingState:
    """Everything needed to score one deployment at one revision; swapped atomically."""

    deployment: DeploymentSpec
    splitter: Splitter
    live: tuple[VariantRuntime, ...]  # in the splitter's order
    shadows: tuple[VariantRuntime, ...]
    dead_letter_topic: str
    max_event_bytes: int = 1_000_000


@dataclass
class BatchResult:
    records: list[OutputRecord] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # variant -> predictions
    shadowed: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)  # error class -> count
    keyless: int = 0
    shadow_errors: int = 0
    # Live variant -> the input timestamps (epoch ms) of the events it answered.
    served_timestamps: dict[str, list[int]] = field(default_factory=dict)

    def absorb(self, other: BatchResult) -> None:
        """Add the next batch's result to this one (delivered together, in log order)."""
        self.records.extend(other.records)
        for mine, theirs in (
            (self.served, other.served),
            (self.shadowed, other.shadowed),
            (self.dead_letters, other.dead_letters),
        ):
            for name, count in theirs.items():
                mine[name] = mine.get(name, 0) + count
        self.keyless += other.keyless
        self.shadow_errors += other.shadow_errors
        for variant, stamps in other.served_timestamps.items():
            self.served_timestamps.setdefault(variant, []).extend(stamps)


def build_state(
    deployment: DeploymentSpec,
    models: dict[str, ScoringModel],
    feature_specs: dict[str, FeatureSpec],
    *,
    dead_letter_topic: str,
    max_event_bytes: int = 1_000_000,
) -> ServingState:
    """The serving state of `deployment`; `models`/`feature_specs` are keyed by variant name.

    Every variant decodes with its own model's schema, but keyed by the deployment's key field.
    """
    assert deployment.key_field is not None
    runtimes = {}
    for variant in deployment.variants:
        spec = feature_specs[variant.name]
        spec = replace(spec, schema=replace(spec.schema, key_field=deployment.key_field))
        runtimes[variant.name] = VariantRuntime(
            variant, models[variant.name], spec, feature_plan(spec)
        )
    splitter = Splitter(deployment.salt, deployment.variants)
    return ServingState(
        deployment=deployment,
        splitter=splitter,
        live=tuple(runtimes[v.name] for v in splitter.live),
        shadows=tuple(runtimes[v.name] for v in splitter.shadows),
        dead_letter_topic=dead_letter_topic,
        max_event_bytes=max_event_bytes,
    )


_UNDECODABLE_PREFIXES = (
    "not JSON",
    "empty value",
    # Schema Registry formats (streams.registry_formats): the bytes cannot be read at all.
    "no Schema Registry framing",
    "unknown schema id",
    "not Avro",
    "not Protobuf",
)


def _error_class(reason: str) -> str:
    if reason.startswith(_UNDECODABLE_PREFIXES) or "Expected `object`" in reason:
        return UNDECODABLE
    return INVALID_EVENT


def _scores_with_bisection(
    model: ScoringModel, features: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Scores of `rows` (aligned), whether each was scored, and the rows whose scoring raises.

    One call for the whole batch; only when it raises (or returns non-finite scores) is the batch
    bisected down to the rows that make it raise.
    """
    try:
        scores = np.asarray(model.scores(features[rows]))
        if len(scores) == len(rows) and np.all(np.isfinite(scores)):
            return scores, np.ones(len(rows), dtype=bool), {}
    except Exception:  # noqa: S110 - isolated row by row below
        pass
    scored: dict[int, Any] = {}
    failed: dict[int, str] = {}

    def attempt(part: np.ndarray) -> None:
        if len(part) == 0:
            return
        try:
            part_scores = np.asarray(model.scores(features[part]))
            if len(part_scores) != len(part) or not np.all(np.isfinite(part_scores)):
                raise ValueError("the model returned missing or non-finite scores")
        except Exception as exc:
            if len(part) == 1:
                failed[int(part[0])] = f"{type(exc).__name__}: {exc}"[:500]
                return
            middle = len(part) // 2
            attempt(part[:middle])
            attempt(part[middle:])
            return
        for row, score in zip(part.tolist(), part_scores, strict=True):
            scored[row] = score

    attempt(rows)
    ok = np.fromiter((int(r) in scored for r in rows), dtype=bool, count=len(rows))
    if not ok.any():
        return np.empty(0), ok, failed
    scores = np.asarray([scored[int(r)] for r in rows[ok]])
    full = np.zeros((len(rows), *scores.shape[1:]), dtype=scores.dtype)
    full[ok] = scores
    return full, ok, failed


@dataclass
class _Decoded:
    """One schema's decode of the batch: rows, and for each batch index its row (-1: bad)."""

    events: DecodedEvents
    row_of: np.ndarray  # batch index -> row
    index_of: np.ndarray  # row -> batch index
    bad: dict[int, str]  # batch index -> reason
    raw: np.ndarray | None = None  # the spec's columns
    derived: dict[str, np.ndarray] = field(default_factory=dict)  # feature-set digest -> columns
    matrices: dict[str | None, np.ndarray] = field(default_factory=dict)

    def features(self, spec: FeatureSpec, plan: FeaturePlan | None) -> np.ndarray:
        """The model's input rows: the spec's columns, then the feature set's (if any)."""
        digest = None if plan is None else plan.digest
        matrix = self.matrices.get(digest)
        if matrix is None:
            if self.raw is None:
                self.raw = spec.transform(self.events)
            matrix = self.raw if plan is None else np.hstack([self.raw, self.derived[plan.digest]])
            self.matrices[digest] = matrix
        return matrix

    def derive(self, plan: FeaturePlan, store: FeatureStore, batch: InputBatch) -> None:
        """Compute the feature set over every decoded row, in log order (the state moves on)."""
        if plan.digest in self.derived:
            return
        events = self.events
        partitions, offsets = batch.partitions, batch.offsets
        indexes = self.index_of.tolist()
        self.derived[plan.digest] = store.derive(
            plan,
            [partitions[i] for i in indexes],
            events.keys,
            events.event_times if events.event_times is not None else np.zeros(events.rows),
            decoded_fields(events),
            [offsets[i] for i in indexes],
        )


def score_batch(
    state: ServingState,
    batch: InputBatch | Sequence[InputEvent],
    *,
    features: FeatureStore | None = None,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> BatchResult:
    """Score `batch` with `state`; returns predictions, dead letters and state changes to produce.

    `features` holds the loop's feature-set state; it is needed when a variant's model was
    trained with a feature set, whose changelog records are then part of the result.
    """
    started = time.perf_counter()
    if not isinstance(batch, InputBatch):
        batch = InputBatch.of_events(batch)
    result = BatchResult()
    deployment = state.deployment
    n = len(batch)
    if n == 0:
        return result

    def dead_letter(i: int, error_class: str, message: str) -> None:
        result.dead_letters[error_class] = result.dead_letters.get(error_class, 0) + 1
        result.records.append(
            OutputRecord(
                state.dead_letter_topic,
                batch.keys[i],
                batch.values[i],
                dead_letter_headers(
                    batch.headers_of(i),
                    error_class=error_class,
                    message=message,
                    deployment=deployment.name,
                    topic=batch.topic,
                    partition=batch.partitions[i],
                    offset=batch.offsets[i],
                ),
            )
        )

    values = batch.values
    limit = state.max_event_bytes
    candidates: list[int] | None = None  # None: every event
    if any(v is not None and len(v) > limit for v in values):
        candidates = []
        for i, v in enumerate(values):
            size = len(v) if v is not None else 0
            if size > limit:
                dead_letter(i, OVERSIZED, f"{size} bytes > {limit}")
            else:
                candidates.append(i)
        if not candidates:
            return result

    # Decode once per distinct schema (variants normally share one); positions are batch indexes.
    decoded: dict[Any, _Decoded] = {}
    for runtime in (*state.live, *state.shadows):
        decoding = runtime.decoding
        if decoding not in decoded:
            decoded[decoding] = _decode(*decoding, values, candidates, n)
        if runtime.plan is not None:
            # Every decodable event joins the state, whichever variant it is routed to.
            if features is None:
                raise ValueError("a model trained with a feature set needs the feature state")
            decoded[decoding].derive(runtime.plan, features, batch)

    routing = decoded[state.live[0].decoding]
    for i, reason in routing.bad.items():
        dead_letter(i, _error_class(reason), reason)
    keys = routing.events.keys
    rows = np.arange(len(keys))
    result.keyless = sum(1 for k in keys if k is None)

    # Every routable row gets its live variant; shadows see the same rows.
    if len(state.live) == 1:
        assignment = [rows]
        route_keys: list[str] | None = None
    else:
        route_keys = _route_keys(keys, routing.index_of, batch)
        chosen = state.splitter.choose_indexes(state.splitter.buckets(route_keys))
        assignment = [rows[chosen == v] for v in range(len(state.live))]

    scored_at = now_ms()
    for runtime, routed in zip(state.live, assignment, strict=True):
        if len(routed):
            _score_variant(
                state,
                runtime,
                routing,
                routed,
                decoded,
                batch,
                result,
                started,
                scored_at,
                dead_letter,
                shadow=False,
            )
    for runtime in state.shadows:
        spec = runtime.spec
        if spec.shadow_sample_pct is None or spec.shadow_sample_pct >= 100:
            sampled = rows
        else:
            if route_keys is None:
                route_keys = _route_keys(keys, routing.index_of, batch)
            shadow_scores = state.splitter.shadow_scores
            sampled = rows[
                np.fromiter(
                    (shadow_scores(spec, k) for k in route_keys), dtype=bool, count=len(rows)
                )
            ]
        if len(sampled):
            _score_variant(
                state,
                runtime,
                routing,
                sampled,
                decoded,
                batch,
                result,
                started,
                scored_at,
                dead_letter,
                shadow=True,
            )
    if features is not None:
        result.records.extend(
            OutputRecord(topic, key, value, [], partition)
            for topic, partition, key, value in features.changelog()
        )
    return result


def _decode(
    schema: Any, with_time: bool, values: list[bytes | None], candidates: list[int] | None, n: int
) -> _Decoded:
    decoder = EventDecoder(schema, training=False, event_time=with_time, max_bad_samples=n)
    if candidates is None:
        decoder.add_batch(values, [0] * n, range(n))
    else:
        decoder.add_batch([values[i] for i in candidates], [0] * len(candidates), candidates)
    events = decoder.result()
    index_of = events.offsets
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[index_of] = np.arange(len(index_of))
    bad = {int(s["offset"]): str(s["reason"]) for s in events.bad.samples}
    return _Decoded(events, row_of, index_of, bad)


def _route_keys(keys: list[str | None], index_of: np.ndarray, batch: InputBatch) -> list[str]:
    """The splitting key per row: the entity key, or the event's position when it has none."""
    if all(k is not None for k in keys):
        return keys  # type: ignore[return-value]
    return [
        routing_key(k, batch.partitions[i], batch.offsets[i])
        for k, i in zip(keys, index_of.tolist(), strict=True)
    ]


def _score_variant(
    state: ServingState,
    runtime: VariantRuntime,
    routing: _Decoded,
    routed: np.ndarray,
    decoded: dict[Any, _Decoded],
    batch: InputBatch,
    result: BatchResult,
    started: float,
    scored_at: int,
    dead_letter: Callable[[int, str, str], None],
    *,
    shadow: bool,
) -> None:
    """Score the routing rows `routed` with one variant and append its records."""
    own = decoded[runtime.decoding]
    indexes = routing.index_of[routed]  # batch indexes
    if own is routing:
        own_rows = routed
    else:  # another schema: rows it could not decode are dead letters (live) or skipped (shadow)
        own_rows = own.row_of[indexes]
        usable = own_rows >= 0
        if not usable.all():
            if not shadow:
                for i in indexes[~usable].tolist():
                    reason = own.bad.get(i, "invalid")
                    dead_letter(i, _error_class(reason), reason)
            own_rows, indexes, routed = own_rows[usable], indexes[usable], routed[usable]
        if not len(own_rows):
            return
    matrix = own.features(runtime.feature_spec, runtime.plan)
    scores, ok, failed = _scores_with_bisection(runtime.model, matrix, own_rows)
    if failed:
        if shadow:
            result.shadow_errors += len(failed)
        else:
            for row, message in failed.items():
                dead_letter(int(own.index_of[row]), MODEL_ERROR, message)
    if not ok.all():
        scores, indexes, routed, own_rows = scores[ok], indexes[ok], routed[ok], own_rows[ok]
    if not len(indexes):
        return
    labels = runtime.model.labels(scores)
    deployment = state.deployment
    assert deployment.output_topic is not None
    counter = result.shadowed if shadow else result.served
    counter[runtime.spec.name] = counter.get(runtime.spec.name, 0) + len(indexes)
    index_list = indexes.tolist()
    if not shadow:
        times = batch.timestamps
        result.served_timestamps.setdefault(runtime.spec.name, []).extend(
            times[i] for i in index_list
        )
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    constant = batch_headers(
        deployment.name,
        deployment.revision,
        runtime.spec.name,
        f"{runtime.spec.model_name}/{runtime.spec.model_version}",
        shadow,
    )
    name, revision, variant = deployment.name, deployment.revision, runtime.spec.name
    model, version = runtime.spec.model_name, runtime.spec.model_version
    topic, output = batch.topic, deployment.output_topic
    topic_bytes = topic.encode()
    append = result.records.append
    # JSON, or Avro framed with the prediction schema's registry id (`output_format: avro`).
    encode = prediction_encoder(deployment.output_format, output)
    keys, partitions, offsets, kafka_keys = (
        routing.events.keys,
        batch.partitions,
        batch.offsets,
        batch.keys,
    )
    vectors = (
        _feature_vectors(runtime.feature_spec.model_columns, matrix[own_rows])
        if deployment.include_features
        else [None] * len(index_list)
    )
    for row, i, score, label, vector in zip(
        routed.tolist(), index_list, scores.tolist(), labels, vectors, strict=True
    ):
        key = keys[row]
        partition, offset = partitions[i], offsets[i]
        prediction = Prediction(
            key=key,
            topic=topic,
            partition=partition,
            offset=offset,
            deployment=name,
            revision=revision,
            variant=variant,
            model=model,
            model_version=version,
            shadow=shadow,
            score=score,
            label=label.item() if isinstance(label, np.generic) else label,
            latency_ms=latency_ms,
            scored_at_ms=scored_at,
            input_ms=batch.timestamps[i],
            features=vector,
        )
        kafka_key = kafka_keys[i]
        append(
            OutputRecord(
                output,
                kafka_key if kafka_key is not None else (key.encode() if key else None),
                encode(prediction),
                [*constant, (H_SOURCE, b"%s/%d/%d" % (topic_bytes, partition, offset))],
            )
        )


def _feature_vectors(columns: list[str], rows: np.ndarray) -> list[dict[str, float | None]]:
    """Each row as {column: value} (NaN, a missing value, as None): `include_features`."""
    return [
        {c: (None if v != v else v) for c, v in zip(columns, row, strict=True)}
        for row in rows.tolist()
    ]
