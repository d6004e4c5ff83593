"""The monitor's counting of prediction records: in-process and end-to-end latency histograms."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS
from carrara.monitoring.aggregates import Deltas, end_to_end_bin, minute
from carrara.monitoring.counting import count_prediction
from carrara.monitoring.watched import Watched, watched_from_spec
from carrara.streams.prediction_record import Prediction, decode_prediction, encode_prediction

WRITTEN_MS = 1_714_557_630_000  # 2024-05-01 10:00:30 UTC: when the scorer wrote the prediction


def _watched() -> dict[str, Watched]:
    spec: dict[str, Any] = {
        "input_topic": "in",
        "output_topic": "out",
        "key_field": "user",
        "variants": [{"name": "a", "model": "m", "version": 1, "weight": 100, "shadow": False}],
    }
    return {"d": watched_from_spec("d", 0, spec)}


def _message(input_ms: int = 0, written_ms: int = WRITTEN_MS) -> Message:
    prediction = Prediction(
        key="u-1",
        topic="in",
        partition=0,
        offset=7,
        deployment="d",
        revision=1,
        variant="a",
        model="m",
        model_version=1,
        score=0.4,
        latency_ms=1.5,
        scored_at_ms=written_ms - 1,
        input_ms=input_ms,
    )
    return Message(
        topic="out",
        value=encode_prediction(prediction),
        timestamp=(TIMESTAMP_CREATE_TIME, written_ms),
    )


def _count(*messages: Message) -> Deltas:
    deltas = Deltas()
    for message in messages:
        count_prediction(message, _watched(), deltas, [])
    return deltas


def test_end_to_end_latency_is_the_prediction_timestamp_minus_the_input_timestamp() -> None:
    deltas = _count(_message(input_ms=WRITTEN_MS - 30), _message(input_ms=WRITTEN_MS - 12_000))
    d = deltas.variants[("d", "a", minute(WRITTEN_MS))]
    assert d.predictions == 2
    assert len(d.end_to_end_histogram) == len(END_TO_END_EDGES_MS) + 1
    expected = [0] * (len(END_TO_END_EDGES_MS) + 1)
    expected[END_TO_END_EDGES_MS.index(40)] = 1  # 30 ms: in (20, 40]
    expected[END_TO_END_EDGES_MS.index(30_000)] = 1  # 12 s: in (10, 30] s
    assert d.end_to_end_histogram == expected
    assert end_to_end_bin(30) == END_TO_END_EDGES_MS.index(40)
    assert end_to_end_bin(120_000) == len(END_TO_END_EDGES_MS)  # the overflow bin
    # The in-process latency is counted apart, in its own bins (1.5 ms: in (1, 2]).
    assert d.latency_histogram[LATENCY_EDGES_MS.index(2)] == 2


def test_a_record_without_input_ms_counts_no_end_to_end_latency() -> None:
    old = _message(input_ms=0)
    assert b"input_ms" not in (old.value() or b"")  # omitted: an older scorer's record
    future = _message(input_ms=WRITTEN_MS + 5)  # another clock ahead of the scorer's
    no_timestamp = _message(input_ms=WRITTEN_MS - 10, written_ms=-1)
    deltas = _count(old, future, no_timestamp)
    counted = list(deltas.variants.values())
    assert sum(d.predictions for d in counted) == 3
    assert all(not any(d.end_to_end_histogram) for d in counted)
    assert sum(sum(d.latency_histogram) for d in counted) == 3


def test_records_of_older_scorers_still_decode() -> None:
    raw = (
        b'{"key":"k","topic":"in","partition":0,"offset":1,"deployment":"d","revision":1,'
        b'"variant":"a","model":"m","model_version":1,"latency_ms":2.0,"scored_at_ms":5}'
    )
    assert decode_prediction(raw).input_ms == 0
