"""Decoding events into the training matrix, bad events, and the serialisable feature spec."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from carrara.streams.event_codec import (
    UNKNOWN_CODE,
    BadEvents,
    BadEventsError,
    DecodedEvents,
    EventDecoder,
    FeatureError,
    FeatureSpec,
    check_bad_event_threshold,
    decode_events,
    fit_feature_spec,
)

SCHEMA: dict[str, Any] = {
    "key_field": "user",
    "event_time_field": "ts",
    "label_field": "fraud",
    "task": "binary",
    "features": [
        {"name": "amount", "type": "float"},
        {"name": "items", "type": "int"},
        {"name": "memo", "type": "string"},  # validated, not a column
        {"name": "new-user", "type": "bool"},  # not a Python identifier on purpose
        {"name": "country", "type": "category"},
    ],
}
COLUMNS = ["amount", "items", "new-user", "country"]


def event(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "user": "u1",
        "ts": 1_714_564_800_000,
        "fraud": False,
        "amount": 12.5,
        "items": 3,
        "memo": "coffee",
        "new-user": True,
        "country": "FR",
    }
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def decode(
    values: list[bytes | None], schema: dict[str, Any] | None = None, **kwargs: Any
) -> DecodedEvents:
    decoder = EventDecoder(schema or SCHEMA, **kwargs)
    decoder.add_batch(values, [7] * len(values), list(range(100, 100 + len(values))))
    return decoder.result()


def test_the_matrix_holds_the_event_values_in_schema_order() -> None:
    values = [
        event(user="a", amount=1.5, items=2, **{"new-user": True}, country="FR", fraud=True),
        event(user=42, amount=-3, items=4.0, **{"new-user": False}, country="DE"),
        event(user="c", amount=None, items=..., **{"new-user": ...}, country=...),
    ]
    decoded = decode(values)
    spec = fit_feature_spec(decoded)
    assert spec.columns == COLUMNS
    assert spec.categorical_columns == [3]
    assert spec.vocabularies == {"country": ["DE", "FR"]}
    matrix = spec.transform(decoded)
    expected = np.array(
        [
            [1.5, 2.0, 1.0, 1.0],
            [-3.0, 4.0, 0.0, 0.0],
            # null and missing values are NaN, for numbers and categories alike
            [math.nan, math.nan, math.nan, math.nan],
        ]
    )
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.float64
    assert decoded.keys == ["a", "42", "c"]  # integer keys as text, for the holdout hash
    np.testing.assert_array_equal(decoded.partitions, [7, 7, 7])
    np.testing.assert_array_equal(decoded.offsets, [100, 101, 102])
    np.testing.assert_array_equal(spec.encode_labels(decoded), [1, 0, 0])
    assert spec.label_classes == [0, 1]
    assert spec.positive_class == 1
    assert decoded.bad.count == 0


def test_a_single_numeric_column_and_explicit_nulls_in_a_batch() -> None:
    schema = {**SCHEMA, "features": [{"name": "amount", "type": "float"}]}
    decoded = decode([event(amount=2), event(amount=None), event(amount=...)], schema)
    np.testing.assert_array_equal(decoded.numeric, [[2.0], [math.nan], [math.nan]])


def test_event_times_become_epoch_milliseconds() -> None:
    values = [
        event(ts="2024-05-01T12:00:00Z"),
        event(ts="2024-05-01T14:00:00+02:00"),
        event(ts="2024-05-01T12:00:00"),  # naive: UTC
        event(ts=1_714_564_800),  # epoch seconds
        event(ts=1_714_564_800_000),  # epoch milliseconds
        event(ts=1_714_564_800.5),
    ]
    times = decode(values).event_times
    assert times is not None
    np.testing.assert_array_equal(times[:5], [1_714_564_800_000.0] * 5)
    assert times[5] == 1_714_564_800_500.0


def test_bad_events_are_counted_with_where_and_why() -> None:
    values = [
        event(),
        b"{not json",
        b"[1, 2]",
        None,
        event(user=...),
        event(amount="12.5"),
        event(items=2.5),
        event(memo=5),
        event(fraud=...),
        event(fraud=None),
        event(ts="yesterday"),
        event(country=1.5),
        event(user="last"),
    ]
    decoded = decode(values)
    assert decoded.keys == ["u1", "last"]
    np.testing.assert_array_equal(decoded.offsets, [100, 112])
    assert decoded.bad.count == 11
    assert decoded.total == 13
    reasons = {s["offset"]: s["reason"] for s in decoded.bad.samples}
    assert all(s["partition"] == 7 for s in decoded.bad.samples)
    assert reasons[101].startswith("not JSON")
    assert reasons[102] == "Expected `object`, got `array`"
    assert reasons[103] == "empty value (a tombstone)"
    assert reasons[104] == "Object missing required field `user`"
    assert reasons[105] == "Expected `float | null`, got `str` - at `$.amount`"
    assert reasons[106] == "Expected `int`, got `2.5` - at `$.items`"
    assert reasons[107] == "Expected `str | null`, got `int` - at `$.memo`"
    assert reasons[108] == "Object missing required field `fraud`"
    assert "got `null` - at `$.fraud`" in reasons[109]
    assert "`'yesterday'` - at `$.ts`" in reasons[110]
    assert "got `float` - at `$.country`" in reasons[111]


def test_the_sample_of_reasons_is_capped_but_the_count_is_not() -> None:
    decoded = decode([b"x"] * 50, max_bad_samples=5)
    assert decoded.bad.count == 50
    assert [s["offset"] for s in decoded.bad.samples] == [100, 101, 102, 103, 104]
    assert decoded.bad.as_dict()["count"] == 50
    assert decoded.rows == 0
    assert decoded.numeric.shape == (0, 3)


def test_batches_accumulate_and_grow_past_the_expected_rows() -> None:
    decoder = EventDecoder(SCHEMA, expected_rows=3)
    for batch in range(4):
        values = [event(user=f"u{batch}-{i}", amount=float(batch * 10 + i)) for i in range(500)]
        decoder.add_batch(values, [batch] * 500, range(500))
    decoded = decoder.result()
    assert decoded.rows == 2000
    np.testing.assert_array_equal(
        decoded.numeric[:, 0], np.repeat([0, 10, 20, 30], 500) + np.tile(np.arange(500), 4)
    )
    np.testing.assert_array_equal(decoded.partitions, np.repeat([0, 1, 2, 3], 500))


def test_decode_events_takes_replay_batches() -> None:
    batches = [([event(user="a")], [0], [5]), ([event(user="b"), b"?"], [1, 1], [8, 9])]
    decoded = decode_events(SCHEMA, batches)
    assert decoded.keys == ["a", "b"]
    assert decoded.bad.samples[0]["offset"] == 9


@pytest.mark.parametrize(
    ("bad", "total", "fails"),
    [(0, 100, False), (1, 100, False), (2, 100, True), (0, 0, False), (101, 10_000, True)],
)
def test_bad_event_threshold(bad: int, total: int, fails: bool) -> None:
    if fails:
        with pytest.raises(BadEventsError, match=r"events \(.*%\) are bad, above the threshold"):
            check_bad_event_threshold(bad, total)
    else:
        check_bad_event_threshold(bad, total)


def test_the_threshold_error_names_examples() -> None:
    bad = BadEvents()
    bad.add(2, 41, "Object missing required field `user`")
    with pytest.raises(BadEventsError) as failure:
        check_bad_event_threshold(bad, 10, threshold=0.05)
    message = str(failure.value)
    assert message.startswith("1 of 10 events (10.00%) are bad, above the threshold of 5.00%")
    assert "partition 2 offset 41: Object missing required field `user`" in message
    check_bad_event_threshold(bad, 10, threshold=0.1)
    with pytest.raises(ValueError, match="fraction"):
        check_bad_event_threshold(bad, 10, threshold=5)


def test_vocabulary_is_learned_on_training_rows_only() -> None:
    values = [event(country=c) for c in ("FR", "FR", "DE", 7, True, "IT", "XX")]
    decoded = decode(values)
    train = np.array([True, True, True, True, True, False, False])
    spec = fit_feature_spec(decoded, train)
    # true is the category 1 (as JSON-equal values); ints sort before strings
    assert spec.vocabularies["country"] == [1, 7, "DE", "FR"]
    codes = spec.transform(decoded)[:, 3]
    np.testing.assert_array_equal(codes, [3, 3, 2, 1, 0, UNKNOWN_CODE, UNKNOWN_CODE])


def test_max_categories_keeps_the_most_frequent() -> None:
    values = [event(country=c) for c in ["a"] * 3 + ["b"] * 2 + ["c"] * 2 + ["d"]]
    spec = fit_feature_spec(decode(values), max_categories=2)
    assert spec.vocabularies["country"] == ["a", "b"]  # ties broken by value


def test_the_spec_round_trips_through_json_and_encodes_live_events_identically() -> None:
    values = [event(user=f"u{i}", country=c, amount=i / 3) for i, c in enumerate("ABCAB")]
    decoded = decode(values)
    spec = fit_feature_spec(decoded, np.array([True, True, False, True, True]))
    restored = FeatureSpec.from_json(spec.to_json())
    assert restored == spec
    assert restored.as_dict() == spec.as_dict()
    assert orjson.loads(spec.to_json())["vocabularies"] == {"country": ["A", "B"]}
    # Live events: no label, no event time; an unknown category; a bad event in the middle.
    live = [event(fraud=..., ts=..., country=c, amount=i / 3) for i, c in enumerate("ABCAB")]
    live.insert(2, b"oops")
    matrix, live_decoded = restored.encode_values(live)
    np.testing.assert_array_equal(matrix, spec.transform(decoded))
    np.testing.assert_array_equal(live_decoded.offsets, [0, 1, 3, 4, 5])  # input positions
    assert live_decoded.bad.samples[0]["offset"] == 2
    assert matrix[2, 3] == UNKNOWN_CODE  # "C" was only in the holdout


def test_spec_refuses_events_of_another_schema_and_bad_json() -> None:
    decoded = decode([event()])
    spec = fit_feature_spec(decoded)
    other = {**SCHEMA, "features": SCHEMA["features"][:2]}
    with pytest.raises(FeatureError, match="different schema"):
        spec.transform(decode([event()], other))
    with pytest.raises(FeatureError, match="format"):
        FeatureSpec.from_dict({**spec.as_dict(), "format": 99})
    with pytest.raises(FeatureError, match="vocabularies"):
        FeatureSpec.from_dict({**spec.as_dict(), "vocabularies": {}})


def test_binary_labels_with_strings_and_a_chosen_positive_class() -> None:
    values = [event(fraud=v) for v in ("yes", "no", "no", "yes")]
    decoded = decode(values)
    spec = fit_feature_spec(decoded)
    assert spec.label_classes == ["no", "yes"]  # the last in sorted order is positive
    np.testing.assert_array_equal(spec.encode_labels(decoded), [1, 0, 0, 1])
    flipped = fit_feature_spec(decoded, positive_class="no")
    assert flipped.label_classes == ["yes", "no"]
    np.testing.assert_array_equal(flipped.encode_labels(decoded), [0, 1, 1, 0])
    with pytest.raises(FeatureError, match="never occurs"):
        fit_feature_spec(decoded, positive_class="maybe")


def test_binary_labels_need_exactly_two_classes() -> None:
    with pytest.raises(FeatureError, match="declare the task as multiclass"):
        fit_feature_spec(decode([event(fraud=v) for v in ("a", "b", "c")]))
    with pytest.raises(FeatureError, match="single class"):
        fit_feature_spec(decode([event(fraud=True), event(fraud=1)]))


def test_multiclass_labels_are_codes_into_sorted_classes() -> None:
    schema = {**SCHEMA, "task": "multiclass"}
    decoded = decode([event(fraud=v) for v in ("b", 3, "a", "b", True)], schema)
    spec = fit_feature_spec(decoded)
    assert spec.label_classes == [1, 3, "a", "b"]
    assert spec.positive_class is None
    np.testing.assert_array_equal(spec.encode_labels(decoded), [3, 1, 2, 3, 0])


def test_regression_and_anomaly_labels() -> None:
    regression = decode([event(fraud=1.5), event(fraud=2)], {**SCHEMA, "task": "regression"})
    spec = fit_feature_spec(regression)
    assert spec.label_classes is None
    np.testing.assert_array_equal(spec.encode_labels(regression), [1.5, 2.0])
    assert decode([event(fraud="high")], {**SCHEMA, "task": "regression"}).bad.count == 1

    anomaly_schema = {**SCHEMA, "task": "anomaly"}
    anomaly = decode([event(fraud=1), event(fraud=...), event(fraud=0.0), event()], anomaly_schema)
    spec = fit_feature_spec(anomaly)
    assert spec.label_classes == [0, 1]
    np.testing.assert_array_equal(spec.encode_labels(anomaly), [1.0, math.nan, 0.0, 0.0])

    unlabeled = {**anomaly_schema, "label_field": None}
    decoded = decode([event()], unlabeled)
    assert decoded.labels is None
    assert fit_feature_spec(decoded).encode_labels(decoded) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_field": "amount"}, "both the label and a feature"),
        ({"key_field": "country"}, "both the key and a feature"),
        ({"label_field": None}, "needs a label field"),
        ({"features": [{"name": "memo", "type": "string"}]}, "no trainable feature"),
        ({"features": [{"name": "a", "type": "float"}] * 2}, "more than once"),
        ({"features": [{"name": "a", "type": "decimal"}]}, "not a dataset schema"),
        ({"task": "ranking"}, "not a dataset schema"),
    ],
)
def test_schemas_that_cannot_make_a_matrix(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FeatureError, match=message):
        EventDecoder({**SCHEMA, **change})
