"""Checking decoded events against a dataset's declared schema."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from carrara.streams.event_schema import (
    EVENT_FIELD,
    EventSchema,
    Feature,
    FeatureType,
    FieldMismatch,
    Task,
    validate_events,
)

SCHEMA = EventSchema(
    key_field="user",
    event_time_field="ts",
    label_field="fraud",
    task=Task.binary,
    features=(
        Feature("amount", FeatureType.float),
        Feature("items", FeatureType.int),
        Feature("new_user", FeatureType.bool),
        Feature("country", FeatureType.category),
        Feature("memo", FeatureType.string),
    ),
)


def event(**overrides: Any) -> bytes:
    base: dict[str, Any] = {
        "user": "u1",
        "ts": "2024-05-01T12:00:00Z",
        "fraud": False,
        "amount": 12.5,
        "items": 3,
        "new_user": True,
        "country": "FR",
        "memo": "coffee",
    }
    base.update(overrides)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def by_field(mismatches: list[FieldMismatch]) -> dict[str, FieldMismatch]:
    return {m.field: m for m in mismatches}


def test_matching_events_have_no_mismatches() -> None:
    values = [
        event(),
        event(user=42, ts=1714564800000, amount=3, items=4.0, country=7, fraud=True),
        event(amount=None, memo=None),  # null features are missing values, which is allowed
    ]
    assert validate_events(SCHEMA, values) == []


def test_no_events_means_nothing_to_disagree_with() -> None:
    assert validate_events(SCHEMA, []) == []


def test_a_string_where_a_float_is_declared_is_named_with_counts_and_an_example() -> None:
    values = [event(), event(amount="12.5"), event(amount="abc")]
    mismatch = by_field(validate_events(SCHEMA, values))["amount"]
    assert mismatch.events == 2
    assert mismatch.expected.startswith("float")
    assert "got string in 2 of 3 sampled events" in mismatch.message
    assert '"12.5"' in mismatch.message


def test_a_missing_feature_and_a_missing_key_are_reported() -> None:
    values = [event(items=..., user=...), event(items=...)]
    mismatches = by_field(validate_events(SCHEMA, values))
    assert set(mismatches) == {"items", "user"}
    assert mismatches["items"].message.endswith("missing in 2 of 2 sampled events")
    assert mismatches["user"].events == 1


@pytest.mark.parametrize(
    ("field", "value", "reported"),
    [
        ("items", 2.5, "got number"),
        ("items", True, "got boolean"),
        ("amount", False, "got boolean"),
        ("new_user", 1, "got integer"),
        ("country", 1.5, "got number"),
        ("country", ["FR"], "got array"),
        ("memo", 5, "got integer"),
        ("user", None, "got null"),
        ("user", True, "got boolean"),
        ("user", 1.5, "got number"),
        ("ts", "yesterday", "got string"),
        ("ts", None, "got null"),
        ("fraud", None, "got null"),
        ("fraud", {"v": 1}, "got object"),
    ],
)
def test_incompatible_types(field: str, value: Any, reported: str) -> None:
    mismatches = by_field(validate_events(SCHEMA, [event(**{field: value})]))
    assert list(mismatches) == [field]
    assert reported in mismatches[field].message


def test_events_that_are_not_json_objects_are_mismatches() -> None:
    values = [b"not json", b"[1, 2]", None, event()]
    mismatches = by_field(validate_events(SCHEMA, values))
    assert list(mismatches) == [EVENT_FIELD]
    assert mismatches[EVENT_FIELD].events == 3
    message = mismatches[EVENT_FIELD].message
    assert "1 of 4 are not JSON" in message
    assert "a JSON array, not an object" in message
    assert "tombstone" in message


def test_a_binary_label_with_three_values_is_not_binary() -> None:
    values = [event(fraud=v) for v in ("yes", "no", "no", "maybe")]
    mismatch = by_field(validate_events(SCHEMA, values))["fraud"]
    assert "at most 2 values; the sample has 3" in mismatch.message
    assert "multiclass" in mismatch.message
    assert mismatch.events == 1


def test_label_rules_follow_the_task() -> None:
    regression = EventSchema(
        key_field="user", label_field="y", task=Task.regression, features=SCHEMA.features
    )
    assert validate_events(regression, [event(y=1.5), event(y=3)]) == []
    assert "got string" in validate_events(regression, [event(y="high")])[0].message

    multiclass = EventSchema(
        key_field="user", label_field="y", task=Task.multiclass, features=SCHEMA.features
    )
    assert validate_events(multiclass, [event(y=c) for c in ("a", "b", "c", 4)]) == []

    anomaly = EventSchema(key_field="user", task=Task.anomaly, features=SCHEMA.features)
    assert validate_events(anomaly, [event(fraud=...)]) == []
    # An anomaly dataset's label is optional (for evaluation): null is fine, a list is not.
    labelled = EventSchema(
        key_field="user", label_field="y", task=Task.anomaly, features=SCHEMA.features
    )
    assert validate_events(labelled, [event(y=None), event(y=1), event(y="odd")]) == []
    assert "got array" in validate_events(labelled, [event(y=[1])])[0].message


def test_mismatches_serialise_for_the_problem_details() -> None:
    mismatch = validate_events(SCHEMA, [event(amount="x")])[0]
    assert mismatch.as_dict() == {
        "field": "amount",
        "expected": "float (a JSON number)",
        "message": mismatch.message,
        "events": 1,
    }
