"""Scoring one micro-batch: decode, route, predict per variant, and build the output records.

Pure with respect to Kafka: it takes input events and returns the records to produce, so the
delivery loop (exactly-once or at-least-once) stays separate and this part is unit-testable.

Per batch: oversized events are dead-lettered first; the rest are decoded once per distinct event
schema with the typed codec; undecodable or invalid events are dead-lettered with the reason; each
remaining event is routed by its entity key (or its offset when keyless) to one live variant; every
live variant scores its rows in one call; a model that raises is bisected down to the events that
make it raise, which are dead-lettered while the rest are scored; shadow variants score their
sample and their results are written marked `shadow`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from carrara.scoring.splitter import Splitter, bucket_of, routing_key
from carrara.streams.consumed import Headers
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec
from carrara.streams.event_codec import DecodedEvents, EventDecoder, FeatureSpec
from carrara.streams.prediction_record import (
    INVALID_EVENT,
    MODEL_ERROR,
    OVERSIZED,
    UNDECODABLE,
    Prediction,
    dead_letter_headers,
    encode_prediction,
    prediction_headers,
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


@dataclass(frozen=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True)
class VariantRuntime:
    spec: VariantSpec
    model: ScoringModel
    feature_spec: FeatureSpec


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
        runtimes[variant.name] = VariantRuntime(variant, models[variant.name], spec)
    splitter = Splitter(deployment.salt, deployment.variants)
    return ServingState(
        deployment=deployment,
        splitter=splitter,
        live=tuple(runtimes[v.name] for v in splitter.live),
        shadows=tuple(runtimes[v.name] for v in splitter.shadows),
        dead_letter_topic=dead_letter_topic,
        max_event_bytes=max_event_bytes,
    )


def _error_class(reason: str) -> str:
    if reason.startswith(("not JSON", "empty value")) or "Expected `object`" in reason:
        return UNDECODABLE
    return INVALID_EVENT


def _scores_with_bisection(
    model: ScoringModel, features: np.ndarray, rows: np.ndarray
) -> tuple[dict[int, Any], dict[int, str]]:
    """Scores per row; rows whose scoring raises (isolated by bisection) map to their error."""
    scored: dict[int, Any] = {}
    failed: dict[int, str] = {}

    def attempt(part: np.ndarray) -> None:
        if len(part) == 0:
            return
        try:
            scores = np.asarray(model.scores(features[part]))
            if len(scores) != len(part) or not np.all(np.isfinite(scores)):
                raise ValueError("the model returned missing or non-finite scores")
        except Exception as exc:
            if len(part) == 1:
                failed[int(part[0])] = f"{type(exc).__name__}: {exc}"[:500]
                return
            middle = len(part) // 2
            attempt(part[:middle])
            attempt(part[middle:])
            return
        for row, score in zip(part.tolist(), scores, strict=True):
            scored[row] = score

    attempt(rows)
    return scored, failed


def score_batch(
    state: ServingState,
    events: Sequence[InputEvent],
    *,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> BatchResult:
    """Score `events` with `state`; returns predictions and dead letters to produce."""
    started = time.perf_counter()
    result = BatchResult()
    deployment = state.deployment
    assert deployment.output_topic is not None

    def dead_letter(event: InputEvent, error_class: str, message: str) -> None:
        result.dead_letters[error_class] = result.dead_letters.get(error_class, 0) + 1
        result.records.append(
            OutputRecord(
                state.dead_letter_topic,
                event.key,
                event.value,
                dead_letter_headers(
                    event.headers,
                    error_class=error_class,
                    message=message,
                    deployment=deployment.name,
                    topic=event.topic,
                    partition=event.partition,
                    offset=event.offset,
                ),
            )
        )

    candidates: list[InputEvent] = []
    for event in events:
        size = len(event.value) if event.value is not None else 0
        if size > state.max_event_bytes:
            dead_letter(event, OVERSIZED, f"{size} bytes > {state.max_event_bytes}")
        else:
            candidates.append(event)
    if not candidates:
        return result

    # Decode once per distinct schema (variants normally share one).
    decoded_by_schema: dict[Any, DecodedEvents] = {}
    row_by_schema: dict[Any, dict[tuple[int, int], int]] = {}
    bad_by_schema: dict[Any, dict[tuple[int, int], str]] = {}
    values = [e.value for e in candidates]
    partitions = [e.partition for e in candidates]
    offsets = [e.offset for e in candidates]
    for runtime in (*state.live, *state.shadows):
        schema = runtime.feature_spec.schema
        if schema in decoded_by_schema:
            continue
        decoder = EventDecoder(schema, training=False, max_bad_samples=len(candidates))
        decoder.add_batch(values, partitions, offsets)
        decoded = decoder.result()
        decoded_by_schema[schema] = decoded
        row_by_schema[schema] = {
            (int(p), int(o)): i
            for i, (p, o) in enumerate(zip(decoded.partitions, decoded.offsets, strict=True))
        }
        bad_by_schema[schema] = {
            (s["partition"], s["offset"]): s["reason"] for s in decoded.bad.samples
        }

    routing_schema = state.live[0].feature_spec.schema
    routing_rows = row_by_schema[routing_schema]
    routing_keys = decoded_by_schema[routing_schema].keys

    # Route every decodable event to its live variant.
    assigned: list[list[tuple[InputEvent, str | None, int]]] = [[] for _ in state.live]
    shadow_candidates: list[tuple[InputEvent, str | None, str]] = []
    for event in candidates:
        position = (event.partition, event.offset)
        row = routing_rows.get(position)
        if row is None:
            reason = bad_by_schema[routing_schema].get(position, "could not be decoded")
            dead_letter(event, _error_class(reason), reason)
            continue
        key = routing_keys[row]
        if key is None:
            result.keyless += 1
        route = routing_key(key, event.partition, event.offset)
        index = state.splitter.choose_index([bucket_of(deployment.salt, route)])[0]
        assigned[index].append((event, key, row))
        if state.shadows:
            shadow_candidates.append((event, key, route))

    for runtime, batch in zip(state.live, assigned, strict=True):
        if not batch:
            continue
        schema = runtime.feature_spec.schema
        own_rows = row_by_schema[schema]
        usable: list[tuple[InputEvent, str | None, int]] = []
        for event, key, _ in batch:
            row = own_rows.get((event.partition, event.offset))
            if row is None:
                reason = bad_by_schema[schema].get((event.partition, event.offset), "invalid")
                dead_letter(event, _error_class(reason), reason)
            else:
                usable.append((event, key, row))
        if not usable:
            continue
        matrix = runtime.feature_spec.transform(decoded_by_schema[schema])
        rows = np.fromiter((row for _, _, row in usable), dtype=np.int64, count=len(usable))
        scored, failed = _scores_with_bisection(runtime.model, matrix, rows)
        latency_ms = (time.perf_counter() - started) * 1000
        _emit(state, runtime, usable, scored, failed, result, latency_ms, now_ms(), shadow=False)
        for event, _, row in usable:
            if row in failed:
                dead_letter(event, MODEL_ERROR, failed[row])

    for runtime in state.shadows:
        schema = runtime.feature_spec.schema
        own_rows = row_by_schema[schema]
        chosen = [
            (event, key, own_rows[(event.partition, event.offset)])
            for event, key, route in shadow_candidates
            if (event.partition, event.offset) in own_rows
            and state.splitter.shadow_scores(runtime.spec, route)
        ]
        if not chosen:
            continue
        matrix = runtime.feature_spec.transform(decoded_by_schema[schema])
        rows = np.fromiter((row for _, _, row in chosen), dtype=np.int64, count=len(chosen))
        scored, failed = _scores_with_bisection(runtime.model, matrix, rows)
        result.shadow_errors += len(failed)
        latency_ms = (time.perf_counter() - started) * 1000
        _emit(state, runtime, chosen, scored, {}, result, latency_ms, now_ms(), shadow=True)
    return result


def _emit(
    state: ServingState,
    runtime: VariantRuntime,
    batch: list[tuple[InputEvent, str | None, int]],
    scored: dict[int, Any],
    failed: dict[int, str],
    result: BatchResult,
    latency_ms: float,
    now: int,
    *,
    shadow: bool,
) -> None:
    ok = [(event, key, row) for event, key, row in batch if row in scored]
    if not ok:
        return
    scores = np.asarray([scored[row] for _, _, row in ok])
    labels = runtime.model.labels(scores)
    deployment = state.deployment
    assert deployment.output_topic is not None
    counter = result.shadowed if shadow else result.served
    counter[runtime.spec.name] = counter.get(runtime.spec.name, 0) + len(ok)
    for (event, key, _), score, label in zip(ok, scores, labels, strict=True):
        prediction = Prediction(
            key=key,
            topic=event.topic,
            partition=event.partition,
            offset=event.offset,
            deployment=deployment.name,
            revision=deployment.revision,
            variant=runtime.spec.name,
            model=runtime.spec.model_name,
            model_version=runtime.spec.model_version,
            shadow=shadow,
            score=score.tolist() if isinstance(score, np.ndarray) else float(score),
            label=label.item() if isinstance(label, np.generic) else label,
            latency_ms=round(latency_ms, 3),
            scored_at_ms=now,
        )
        result.records.append(
            OutputRecord(
                deployment.output_topic,
                event.key if event.key is not None else (key.encode() if key else None),
                encode_prediction(prediction),
                prediction_headers(prediction),
            )
        )
