"""A dataset's event schema, and checking decoded JSON events against it.

Events on a dataset topic are JSON objects with flat, top-level fields. The check answers which
declared fields disagree with a sample of events and why, so a user can fix the declaration (or
the producer) before a training run fails hours later on the same mismatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import orjson

# The pseudo-field a mismatch is reported under when an event is not a JSON object at all.
EVENT_FIELD = "(event)"
# A binary label with more distinct values than this in the sample cannot be binary.
BINARY_CLASSES = 2


class FeatureType(StrEnum):
    float = "float"
    int = "int"
    bool = "bool"
    category = "category"
    string = "string"


class EventFormat(StrEnum):
    """How a dataset's records are encoded (README: Event formats)."""

    json = "json"  # a JSON object per record, no framing
    avro = "avro"  # Confluent wire format: magic byte 0, 4-byte schema id, Avro binary
    protobuf = "protobuf"  # ... message indexes, then the Protobuf message
    json_schema = "json_schema"  # ... then a JSON object


REGISTRY_FORMATS = (EventFormat.avro, EventFormat.protobuf, EventFormat.json_schema)


class NullPolicy(StrEnum):
    """How a feature reads a null (or a field its record's schema does not have)."""

    missing = "missing"  # a missing value (NaN; no category), which trainers handle
    reject = "reject"  # the event is bad (dead-lettered by scorers)


class Task(StrEnum):
    binary = "binary"
    multiclass = "multiclass"
    regression = "regression"
    anomaly = "anomaly"  # unlabeled: the label field is optional


@dataclass(frozen=True)
class Feature:
    name: str
    type: FeatureType
    # Registry formats: where the value is in the record (dots for nested fields, e.g.
    # `payment.amount`); None = the field named like the feature.
    path: str | None = None
    nulls: NullPolicy = NullPolicy.missing
    # The value a record gets when its writer schema lacks the field (the reader schema's default,
    # read when the dataset was checked against its subject); None: a missing value.
    default: float | int | str | bool | None = None

    @property
    def field(self) -> str:
        """The field path the value is read from."""
        return self.path or self.name


@dataclass(frozen=True)
class EventSchema:
    """What a dataset declares about the events of its topic."""

    key_field: str
    features: tuple[Feature, ...]
    task: Task
    label_field: str | None = None
    event_time_field: str | None = None
    format: EventFormat = EventFormat.json
    # Registry formats: the subject whose schemas the records are written with (for the checks and
    # the UI; decoding uses the schema id each record names).
    subject: str | None = None


@dataclass(frozen=True)
class FieldMismatch:
    """One declared field that sampled events disagree with."""

    field: str
    expected: str
    message: str
    events: int  # how many sampled events disagree

    def as_dict(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "expected": self.expected,
            "message": self.message,
            "events": self.events,
        }


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value, as a user would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    # JSON has one number type: 3.0 is a fine integer, 3.5 is not.
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_label_value(value: Any) -> bool:
    # bool is an int in Python, which is what we want here: true/false are fine class values.
    return isinstance(value, str | int)


def _is_key(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float)


def _is_timestamp(value: Any) -> bool:
    if _is_number(value):
        return True  # epoch seconds or milliseconds
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return False
        return True
    return False


Check = Callable[[Any], bool]

FEATURE_CHECKS: dict[FeatureType, Check] = {
    FeatureType.float: _is_number,
    FeatureType.int: _is_integer,
    FeatureType.bool: lambda v: isinstance(v, bool),
    FeatureType.category: _is_label_value,
    FeatureType.string: lambda v: isinstance(v, str),
}
FEATURE_EXPECTED: dict[FeatureType, str] = {
    FeatureType.float: "float (a JSON number)",
    FeatureType.int: "int (a JSON integer)",
    FeatureType.bool: "bool (true or false)",
    FeatureType.category: "category (a string, integer or boolean)",
    FeatureType.string: "string",
}
LABEL_CHECKS: dict[Task, tuple[str, Check]] = {
    Task.binary: ("binary label (a boolean, integer or string)", _is_label_value),
    Task.multiclass: ("class label (a string, integer or boolean)", _is_label_value),
    Task.regression: ("regression target (a JSON number)", _is_number),
    Task.anomaly: ("label (a boolean, number or string)", _is_scalar),
}


@dataclass
class _FieldRule:
    field: str
    expected: str
    check: Check
    # Features may be null (a missing value, which trainers impute); keys, times and labels not
    # (except the optional label of an anomaly dataset).
    nullable: bool
    # reason -> [count, example]
    problems: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    bad_events: int = 0

    def observe(self, event: dict[str, Any]) -> None:
        if self.field not in event:
            self._note("missing")
            return
        value = event[self.field]
        if value is None and self.nullable:
            return
        if value is None or not self.check(value):
            self._note(f"got {json_type(value)}", value)

    def _note(self, reason: str, example: Any = None) -> None:
        self.bad_events += 1
        seen = self.problems.setdefault(reason, [0, example])
        seen[0] += 1


def _example(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."


def _rules(schema: EventSchema) -> list[_FieldRule]:
    rules = [_FieldRule(schema.key_field, "key (a string or integer)", _is_key, False)]
    if schema.event_time_field:
        rules.append(
            _FieldRule(
                schema.event_time_field,
                "event time (an ISO 8601 string or epoch number)",
                _is_timestamp,
                False,
            )
        )
    if schema.label_field:
        expected, check = LABEL_CHECKS[schema.task]
        # Anomaly detection is unsupervised: a label there is optional, for evaluation only.
        nullable = schema.task is Task.anomaly
        rules.append(_FieldRule(schema.label_field, expected, check, nullable))
    for feature in schema.features:
        rules.append(
            _FieldRule(
                feature.name, FEATURE_EXPECTED[feature.type], FEATURE_CHECKS[feature.type], True
            )
        )
    return rules


def decode_event(value: bytes | None) -> dict[str, Any] | str:
    """A Kafka record value as a JSON object, or the reason it is not one."""
    if value is None:
        return "an empty value (tombstone)"
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(decoded, dict):
        return f"a JSON {json_type(decoded)}, not an object"
    return decoded


def validate_events(schema: EventSchema, values: Iterable[bytes | None]) -> list[FieldMismatch]:
    """Fields of `schema` that the raw events `values` disagree with, and why (empty if none)."""
    rules = _rules(schema)
    undecodable: dict[str, int] = {}
    labels: dict[Any, int] = {}
    total = 0
    for value in values:
        total += 1
        event = decode_event(value)
        if isinstance(event, str):
            undecodable[event] = undecodable.get(event, 0) + 1
            continue
        for rule in rules:
            rule.observe(event)
        if schema.label_field and schema.task is Task.binary:
            label = event.get(schema.label_field)
            if _is_label_value(label):
                labels[label] = labels.get(label, 0) + 1

    mismatches = []
    if undecodable:
        reasons = "; ".join(f"{n} of {total} are {why}" for why, n in undecodable.items())
        mismatches.append(
            FieldMismatch(EVENT_FIELD, "a JSON object", reasons, sum(undecodable.values()))
        )
    for rule in rules:
        if not rule.problems:
            continue
        parts = []
        for reason, (count, example) in rule.problems.items():
            suffix = "" if reason == "missing" else f" (e.g. {_example(example)})"
            parts.append(f"{reason} in {count} of {total} sampled events{suffix}")
        message = f"expected {rule.expected}: " + "; ".join(parts)
        mismatches.append(FieldMismatch(rule.field, rule.expected, message, rule.bad_events))
    if len(labels) > BINARY_CLASSES and schema.label_field:
        by_frequency = sorted(labels, key=labels.__getitem__, reverse=True)
        values_seen = ", ".join(_example(v) for v in by_frequency[:5])
        mismatches.append(
            FieldMismatch(
                schema.label_field,
                LABEL_CHECKS[Task.binary][0],
                f"a binary label takes at most {BINARY_CLASSES} values; the sample has "
                f"{len(labels)} ({values_seen}{', ...' if len(labels) > 5 else ''}): "
                "declare the task as multiclass",
                sum(labels[v] for v in by_frequency[BINARY_CLASSES:]),
            )
        )
    return mismatches
