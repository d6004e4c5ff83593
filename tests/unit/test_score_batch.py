"""Scoring one micro-batch: routing, shadows, dead letters for every kind of bad event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from carrara.scoring.batch import InputEvent, build_state, score_batch
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec
from carrara.streams.event_codec import decode_events, fit_feature_spec
from carrara.streams.prediction_record import (
    H_ERROR_CLASS,
    H_SHADOW,
    H_SOURCE_OFFSET,
    decode_prediction,
)

SCHEMA = {
    "key_field": "card_id",
    "task": "binary",
    "label_field": "fraud",
    "features": [{"name": "amount", "type": "float"}, {"name": "merchant", "type": "category"}],
}


class SigmoidOfAmount:
    """A real (tiny) model: P(fraud) = sigmoid(amount / 100); raises on amount == 666."""

    def __init__(self, name: str, version: int) -> None:
        self.model_name, self.version = name, version

    def scores(self, features: np.ndarray) -> np.ndarray:
        if np.any(features[:, 0] == 666):
            raise ValueError("cursed amount")
        return 1 / (1 + np.exp(-features[:, 0] / 100))

    def labels(self, scores: np.ndarray) -> list[Any]:
        return [int(s >= 0.5) for s in scores]


def _spec() -> Any:
    training = [
        orjson.dumps({"card_id": f"c{i}", "amount": float(i), "merchant": m, "fraud": i % 2})
        for i, m in enumerate(["grocery", "online", "travel"] * 10)
    ]
    decoded = decode_events(SCHEMA, [(training, [0] * 30, list(range(30)))])
    return fit_feature_spec(decoded)


def _state(shadow: bool = False, max_bytes: int = 1_000_000) -> Any:
    variants = [
        VariantSpec(name="a", model_name="m", model_version=1, weight=50),
        VariantSpec(name="b", model_name="m", model_version=2, weight=50),
    ]
    if shadow:
        variants.append(
            VariantSpec(name="s", model_name="m", model_version=3, weight=0, shadow=True)
        )
    deployment = DeploymentSpec(
        name="fraud",
        revision=4,
        salt="abc",
        published_at=datetime.now(UTC),
        input_topic="in",
        output_topic="out",
        key_field="card_id",
        pool="default",
        variants=tuple(variants),
    )
    models = {v.name: SigmoidOfAmount("m", v.model_version) for v in variants}
    specs = {v.name: _spec() for v in variants}
    return build_state(
        deployment, models, specs, dead_letter_topic="in.dead-letters", max_event_bytes=max_bytes
    )


def _event(offset: int, value: bytes | None, key: bytes | None = b"k") -> InputEvent:
    return InputEvent(
        key=key, value=value, headers=[("trace", b"t1")], topic="in", partition=0, offset=offset
    )


def test_every_good_event_gets_exactly_one_served_prediction() -> None:
    events = [
        _event(i, orjson.dumps({"card_id": f"card-{i}", "amount": i, "merchant": "online"}))
        for i in range(200)
    ]
    result = score_batch(_state(), events)
    predictions = [decode_prediction(r.value) for r in result.records if r.topic == "out"]
    assert sorted(p.offset for p in predictions) == list(range(200))
    assert {p.variant for p in predictions} == {"a", "b"}
    assert all(p.revision == 4 and not p.shadow for p in predictions)
    first = next(p for p in predictions if p.offset == 100)
    assert first.key == "card-100"
    assert first.score == 1 / (1 + np.exp(-1.0))
    assert first.label == 1
    assert sum(result.served.values()) == 200


def test_shadow_variants_score_every_event_and_are_marked() -> None:
    events = [_event(i, orjson.dumps({"card_id": f"k{i}", "amount": 1.0})) for i in range(20)]
    result = score_batch(_state(shadow=True), events)
    shadows = [r for r in result.records if dict(r.headers)[H_SHADOW] == b"true"]
    assert len(shadows) == 20
    assert all(decode_prediction(r.value).variant == "s" for r in shadows)
    assert result.shadowed == {"s": 20}


def test_bad_events_go_to_the_dead_letter_topic_with_their_reason() -> None:
    events = [
        _event(0, b"not json at all"),
        _event(1, orjson.dumps({"card_id": "x", "amount": "lots"})),  # mistyped
        _event(2, orjson.dumps([1, 2, 3])),  # not an object
        _event(3, b"{" + b" " * 2000 + b"}"),  # oversized for this state
        _event(4, orjson.dumps({"card_id": "ok", "amount": 666.0})),  # the model raises
        _event(5, orjson.dumps({"card_id": "fine", "amount": 5.0})),
    ]
    result = score_batch(_state(max_bytes=1000), events)
    dead = {
        int(dict(r.headers)[H_SOURCE_OFFSET]): r
        for r in result.records
        if r.topic == "in.dead-letters"
    }
    classes = {offset: dict(r.headers)[H_ERROR_CLASS].decode() for offset, r in dead.items()}
    assert classes == {
        0: "undecodable",
        1: "invalid-event",
        2: "undecodable",
        3: "oversized",
        4: "model-error",
    }
    assert dead[1].value == events[1].value  # original bytes, original key and headers kept
    assert dead[1].key == b"k"
    assert ("trace", b"t1") in dead[1].headers
    assert b"amount" in dict(dead[1].headers)["carrara-error-message"]
    assert b"cursed amount" in dict(dead[4].headers)["carrara-error-message"]
    served = [decode_prediction(r.value).offset for r in result.records if r.topic == "out"]
    assert served == [5]


def test_keyless_events_are_scored_split_by_offset_and_counted() -> None:
    events = [_event(i, orjson.dumps({"amount": 1.0}), key=None) for i in range(10)]
    result = score_batch(_state(), events)
    predictions = [decode_prediction(r.value) for r in result.records]
    assert len(predictions) == 10
    assert all(p.key is None for p in predictions)
    assert result.keyless == 10


def test_a_batch_result_absorbs_the_next_in_order() -> None:
    from carrara.scoring.batch import BatchResult, OutputRecord

    first = BatchResult(
        records=[OutputRecord("out", b"k1", b"v1", [])],
        served={"a": 1},
        dead_letters={"invalid-event": 1},
        keyless=1,
        served_timestamps={"a": [10]},
    )
    second = BatchResult(
        records=[OutputRecord("out", b"k2", b"v2", []), OutputRecord("log", b"k", None, [], 3)],
        served={"a": 2, "b": 1},
        shadowed={"s": 3},
        dead_letters={"invalid-event": 2, "oversized": 1},
        shadow_errors=1,
        served_timestamps={"a": [11, 12], "b": [13]},
    )
    first.absorb(second)
    assert [r.key for r in first.records] == [b"k1", b"k2", b"k"]
    assert first.records[-1].partition == 3
    assert first.served == {"a": 3, "b": 1}
    assert first.shadowed == {"s": 3}
    assert first.dead_letters == {"invalid-event": 3, "oversized": 1}
    assert (first.keyless, first.shadow_errors) == (1, 1)
    assert first.served_timestamps == {"a": [10, 11, 12], "b": [13]}
