"""The event codec: events to a feature matrix per the dataset schema, for training and scoring.

Decoding uses a msgspec Struct generated from the schema, which checks every declared type while
parsing: decode + matrix measured here at ~1.7 us per 20-float event, against ~3.3 us with
msgspec's untyped decode and per-field extraction (stdlib json is slower still). The field types
follow the dataset check of `carrara.streams.event_schema`, so events accepted when the dataset was
declared decode here too.

Columns, in schema order (string features are validated but not part of the matrix):
- float / int / bool -> float64 (bool as 0/1); a missing or null value is NaN, which the
  histogram-based trainers handle natively (the others impute);
- category -> the integer code of the value in a vocabulary learned on the training rows only;
  a value outside the vocabulary is -1, a missing value NaN (tree models treat both as missing).

Event times (ISO 8601 strings or epoch numbers) become epoch milliseconds; epoch numbers below
1e11 are taken as seconds.

The vocabularies, label classes and schema form a `FeatureSpec`, serialisable to JSON, so the
scorer encodes live events exactly as the model saw them in training.

Bad events (not JSON, not an object, missing key, mistyped field, missing label) do not stop the
decode: they are counted with a capped sample of reasons, and `check_bad_event_threshold` decides
whether there are too many.

Why one module of ~950 lines: decoding (JSON structs, registry rows and columns), the value checks
and the feature spec that encodes live events exactly as in training are one contract between the
trainer and the scorer, tested as one; the registry formats' readers live apart
(`carrara.streams.registry_formats`, `carrara.streams.avro_columns`).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain, compress, repeat
from typing import Any

import msgspec
import numpy as np
import orjson

from carrara.features.plan import COLUMN_PREFIX
from carrara.streams.event_schema import (
    REGISTRY_FORMATS,
    EventFormat,
    EventSchema,
    Feature,
    FeatureType,
    NullPolicy,
    Task,
)
from carrara.streams.registry_formats import (
    HEADER_BYTES,
    JsonSchemaId,
    reader_for,
    slots,
    split_by_schema_id,
)
from carrara.streams.schema_registry import Registry, default_registry

DEFAULT_BAD_EVENT_THRESHOLD = 0.01
DEFAULT_MAX_BAD_SAMPLES = 20
SPEC_FORMAT = 1
# A category value outside the training vocabulary.
UNKNOWN_CODE = -1
# Epoch numbers below this are seconds (1e11 s is the year 5138; 1e11 ms is 1973).
_SECONDS_BELOW = 1e11

NUMERIC_TYPES = (FeatureType.float, FeatureType.int, FeatureType.bool)

Label = str | int


class FeatureError(ValueError):
    """The schema or the decoded data cannot make a training matrix (a clear, final reason)."""


class BadEventsError(FeatureError):
    """More bad events than the run's threshold allows."""


# --- schema -----------------------------------------------------------------------------------


def as_event_schema(schema: EventSchema | Mapping[str, Any]) -> EventSchema:
    """An `EventSchema` from itself or from a dataset's fields (key_field, task, features...)."""
    if isinstance(schema, EventSchema):
        # A tuple of features keeps the schema hashable (the compiled decoder is cached by it).
        if isinstance(schema.features, tuple):
            return schema
        return replace(schema, features=tuple(schema.features))
    try:
        features = tuple(
            Feature(
                str(f["name"]),
                FeatureType(f["type"]),
                path=f.get("path") or None,
                nulls=NullPolicy(f.get("nulls") or NullPolicy.missing),
                default=f.get("default"),
            )
            for f in schema["features"]
        )
        return EventSchema(
            key_field=str(schema["key_field"]),
            features=features,
            task=Task(schema["task"]),
            label_field=schema.get("label_field") or None,
            event_time_field=schema.get("event_time_field") or None,
            format=EventFormat(schema.get("format") or EventFormat.json),
            subject=schema.get("subject") or None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatureError(f"not a dataset schema ({type(exc).__name__}: {exc})") from exc


def schema_as_dict(schema: EventSchema) -> dict[str, Any]:
    """The JSON form of a schema (the inverse of `as_event_schema`)."""
    data: dict[str, Any] = {
        "key_field": schema.key_field,
        "event_time_field": schema.event_time_field,
        "label_field": schema.label_field,
        "task": str(schema.task),
        "features": [feature_as_dict(f) for f in schema.features],
    }
    # JSON datasets keep the form older scorers read; registry formats say where records are.
    if schema.format is not EventFormat.json:
        data["format"] = str(schema.format)
        data["subject"] = schema.subject
    return data


def feature_as_dict(feature: Feature) -> dict[str, Any]:
    """A feature's JSON form: name and type, plus its path, null policy and default when set."""
    data: dict[str, Any] = {"name": feature.name, "type": str(feature.type)}
    if feature.path is not None:
        data["path"] = feature.path
    if feature.nulls != NullPolicy.missing:
        data["nulls"] = str(feature.nulls)
    if feature.default is not None:
        data["default"] = feature.default
    return data


def _check_schema(schema: EventSchema) -> None:
    names = [f.name for f in schema.features]
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise FeatureError(f"features declared more than once: {', '.join(duplicates)}")
    roles = {"key": schema.key_field}
    if schema.label_field:
        roles["label"] = schema.label_field
    if schema.event_time_field:
        roles["event time"] = schema.event_time_field
    for role, name in roles.items():
        if name in names:
            raise FeatureError(f"field '{name}' is both the {role} and a feature")
    if len(set(roles.values())) < len(roles):
        raise FeatureError(f"the key, label and event-time fields must differ: {roles}")
    if schema.task is not Task.anomaly and not schema.label_field:
        raise FeatureError(f"a {schema.task} dataset needs a label field")
    if not any(f.type is not FeatureType.string for f in schema.features):
        raise FeatureError("the schema has no trainable feature (string features are not used)")


_FEATURE_TYPES: dict[FeatureType, Any] = {
    FeatureType.float: float | None,  # msgspec accepts JSON integers for float fields
    FeatureType.int: int | float | None,  # 3.0 is an integer in JSON; 3.5 is refused after
    FeatureType.bool: bool | None,
    FeatureType.category: str | int | bool | None,
    FeatureType.string: str | None,
}
_LABEL_TYPES: dict[Task, Any] = {
    Task.binary: str | int | bool,
    Task.multiclass: str | int | bool,
    Task.regression: float,
    Task.anomaly: str | int | float | bool | None,  # unlabeled events are fine
}


@dataclass(frozen=True)
class _Compiled:
    """The msgspec decoder and field getters generated for one schema."""

    decode: Any
    numeric: tuple[str, ...]  # numeric feature names, in schema order
    numeric_getter: Any
    int_columns: tuple[int, ...]  # indexes (in `numeric`) of int features
    categories: tuple[str, ...]
    category_getters: tuple[Any, ...]
    key_getter: Any
    label_getter: Any | None
    time_getter: Any | None


@lru_cache(maxsize=64)
def _compile(schema: EventSchema, training: bool, with_time: bool) -> _Compiled:
    _check_schema(schema)
    # Attribute names are generated (f0, f1...) and renamed to the JSON names, so any field name
    # works, including ones that are not Python identifiers or that clash with keywords.
    # Training needs every event's entity key (the holdout hashes it); a scorer splits keyless
    # events by their offset instead, so there the key is optional (None when absent).
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        ("key", str | int) if training else ("key", str | int | None, None)
    ]
    rename = {"key": schema.key_field}
    label_attr = time_attr = None
    if with_time and schema.event_time_field:
        time_attr = "event_time"
        fields.append((time_attr, int | float | str))
        rename[time_attr] = schema.event_time_field
    if training and schema.label_field:
        label_attr = "label"
        label_type = _LABEL_TYPES[schema.task]
        fields.append(
            (label_attr, label_type, None)
            if schema.task is Task.anomaly
            else (label_attr, label_type)
        )
        rename[label_attr] = schema.label_field
    numeric: list[str] = []
    numeric_attrs: list[str] = []
    int_columns: list[int] = []
    categories: list[str] = []
    category_attrs: list[str] = []
    for i, feature in enumerate(schema.features):
        attr = f"f{i}"
        # A missing numeric field defaults to NaN rather than None, so a batch without explicit
        # nulls converts to float64 in one pass (see `_numeric_matrix`).
        default = math.nan if feature.type in NUMERIC_TYPES else None
        fields.append((attr, _FEATURE_TYPES[feature.type], default))
        rename[attr] = feature.field
        if feature.type in NUMERIC_TYPES:
            if feature.type is FeatureType.int:
                int_columns.append(len(numeric))
            numeric.append(feature.name)
            numeric_attrs.append(attr)
        elif feature.type is FeatureType.category:
            categories.append(feature.name)
            category_attrs.append(attr)
    # gc=False: the structs hold only scalars, and skipping GC tracking makes decoding faster.
    struct = msgspec.defstruct("Event", fields, kw_only=True, gc=False, rename=rename)
    return _Compiled(
        decode=msgspec.json.Decoder(struct).decode,
        numeric=tuple(numeric),
        numeric_getter=operator.attrgetter(*numeric_attrs) if numeric_attrs else None,
        int_columns=tuple(int_columns),
        categories=tuple(categories),
        category_getters=tuple(operator.attrgetter(a) for a in category_attrs),
        key_getter=operator.attrgetter("key"),
        label_getter=operator.attrgetter(label_attr) if label_attr else None,
        time_getter=operator.attrgetter(time_attr) if time_attr else None,
    )


@lru_cache(maxsize=64)
def _compile_rows(schema: EventSchema, training: bool, with_time: bool) -> _Compiled:
    """Getters over the rows registry readers make: `(key, [event time], [label], *features)`."""
    _check_schema(schema)
    layout = slots(schema, training, with_time)
    at = 1
    time_at = label_at = None
    if with_time and schema.event_time_field:
        time_at, at = at, at + 1
    if training and schema.label_field:
        label_at, at = at, at + 1
    numeric: list[str] = []
    numeric_at: list[int] = []
    int_columns: list[int] = []
    categories: list[str] = []
    category_at: list[int] = []
    for feature in schema.features:
        if feature.type in NUMERIC_TYPES:
            if feature.type is FeatureType.int:
                int_columns.append(len(numeric))
            numeric.append(feature.name)
            numeric_at.append(at)
        elif feature.type is FeatureType.category:
            categories.append(feature.name)
            category_at.append(at)
        at += 1
    assert at == len(layout)
    return _Compiled(
        decode=None,
        numeric=tuple(numeric),
        numeric_getter=operator.itemgetter(*numeric_at) if numeric_at else None,
        int_columns=tuple(int_columns),
        categories=tuple(categories),
        category_getters=tuple(operator.itemgetter(j) for j in category_at),
        key_getter=operator.itemgetter(0),
        label_getter=operator.itemgetter(label_at) if label_at is not None else None,
        time_getter=operator.itemgetter(time_at) if time_at is not None else None,
    )


# --- decoding ---------------------------------------------------------------------------------


@dataclass
class BadEvents:
    """How many events could not be used, and a capped sample of where and why."""

    count: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    max_samples: int = DEFAULT_MAX_BAD_SAMPLES

    def add(self, partition: int, offset: int, reason: str) -> None:
        self.count += 1
        if len(self.samples) < self.max_samples:
            self.samples.append({"partition": partition, "offset": offset, "reason": reason})

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "samples": list(self.samples)}


@dataclass
class DecodedEvents:
    """The good events of a replay as columns, with lineage; `bad` holds the rest."""

    schema: EventSchema
    numeric: np.ndarray  # (rows, numeric features) float64, NaN = missing
    categories: dict[str, list[Any]]  # raw values per category feature (None = missing)
    labels: list[Any] | np.ndarray | None  # raw class values; float64 array for regression
    keys: list[str | None]  # entity keys, as strings (None for a keyless event when not training)
    event_times: np.ndarray | None  # epoch milliseconds, float64
    partitions: np.ndarray  # int32
    offsets: np.ndarray  # int64
    bad: BadEvents

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def total(self) -> int:
        """Events seen: good rows plus bad events."""
        return self.rows + self.bad.count


@dataclass
class _Columns:
    """One batch's decoded events as columns, before the value checks."""

    numeric: np.ndarray  # (rows, numeric features) float64, NaN = missing
    keys: list[Any]
    categories: list[list[Any]]  # per category feature, in `_Compiled.categories` order
    labels: list[Any] | None
    times: list[Any] | None  # raw event times (numbers or ISO strings)

    def take(self, order: np.ndarray) -> _Columns:
        at = order.tolist()
        return _Columns(
            numeric=self.numeric[order],
            keys=[self.keys[k] for k in at],
            categories=[[values[k] for k in at] for values in self.categories],
            labels=None if self.labels is None else [self.labels[k] for k in at],
            times=None if self.times is None else [self.times[k] for k in at],
        )

    @staticmethod
    def concat(parts: list[_Columns], c: _Compiled) -> _Columns:
        return _Columns(
            numeric=np.concatenate([p.numeric for p in parts]),
            keys=[k for p in parts for k in p.keys],
            categories=[
                [v for p in parts for v in p.categories[j]] for j in range(len(c.categories))
            ],
            labels=None if c.label_getter is None else [v for p in parts for v in p.labels or []],
            times=None if c.time_getter is None else [v for p in parts for v in p.times or []],
        )


class EventDecoder:
    """Accumulates replayed batches into columns; `training=False` skips label and event time.

    `event_time` overrides whether the event time is read (and required): a scorer computing a
    feature set reads it without the label.
    """

    def __init__(
        self,
        schema: EventSchema | Mapping[str, Any],
        *,
        training: bool = True,
        event_time: bool | None = None,
        max_bad_samples: int = DEFAULT_MAX_BAD_SAMPLES,
        expected_rows: int = 0,
        registry: Registry | None = None,
    ) -> None:
        self.schema = as_event_schema(schema)
        self.training = training
        self.with_time = training if event_time is None else event_time
        fmt = self.schema.format
        # Registry formats read the writer schema each record's id names (`registry`, default:
        # the process's, from CARRARA_SCHEMA_REGISTRY_*); JSON Schema payloads are JSON.
        self._registry = registry
        if fmt in REGISTRY_FORMATS and fmt is not EventFormat.json_schema:
            self._c = _compile_rows(self.schema, training, self.with_time)
        else:
            self._c = _compile(self.schema, training, self.with_time)
        names = {f.name: f for f in self.schema.features}
        self._reject_numeric = [
            j for j, name in enumerate(self._c.numeric) if names[name].nulls == NullPolicy.reject
        ]
        self._reject_categories = [
            name for name in self._c.categories if names[name].nulls == NullPolicy.reject
        ]
        self.bad = BadEvents(max_samples=max_bad_samples)
        # `expected_rows` (the snapshot's event count) sizes the columns once: no regrowth and
        # no final concatenation, which would briefly need twice the matrix's memory.
        self._numeric = _Buffer(np.float64, expected_rows, len(self._c.numeric))
        self._categories: dict[str, list[Any]] = {name: [] for name in self._c.categories}
        self._labels: list[Any] = []
        regression = self._c.label_getter is not None and self.schema.task is Task.regression
        self._regression = _Buffer(np.float64, expected_rows if regression else 0)
        self._keys: list[str | None] = []
        self._times = _Buffer(np.float64, expected_rows if self._c.time_getter else 0)
        self._partitions = _Buffer(np.int32, expected_rows)
        self._offsets = _Buffer(np.int64, expected_rows)

    def add_batch(
        self,
        values: Sequence[bytes | None],
        partitions: Sequence[int] | np.ndarray,
        offsets: Sequence[int] | np.ndarray,
    ) -> None:
        """Decode one batch of raw event values (with where each came from).

        Registry formats raise `RegistryUnavailable` when the registry does not answer (the batch
        can be retried); every other problem makes the event bad, with the reason.
        """
        if self.schema.format is not EventFormat.json:
            columns, parts, offs = self._decode_registry(values, partitions, offsets)
            self._accumulate(columns, parts, offs)
            return
        c = self._c
        decode = c.decode
        try:
            events = list(map(decode, values))
            parts = np.asarray(partitions, dtype=np.int32)
            offs = np.asarray(offsets, dtype=np.int64)
        except (msgspec.DecodeError, TypeError):
            # Rare path: find the bad events one by one (a batch is a few thousand at most).
            events, parts, offs = self._decode_one_by_one(values, partitions, offsets)
        self._accumulate(self._columns(events), parts, offs)

    def _decode_registry(
        self,
        values: Sequence[bytes | None],
        partitions: Sequence[int] | np.ndarray,
        offsets: Sequence[int] | np.ndarray,
    ) -> tuple[_Columns, np.ndarray, np.ndarray]:
        """Columns of framed records, each decoded with its writer schema; bad ones noted."""
        parts = np.asarray(partitions, dtype=np.int32)
        offs = np.asarray(offsets, dtype=np.int64)
        groups, bad = split_by_schema_id(values)
        if self._registry is None:
            self._registry = default_registry()
        decoded: list[_Columns] = []
        good: list[int] = []
        whole = not bad and len(groups) == 1
        for schema_id, indexes in groups.items():
            reader = reader_for(
                self._registry, self.schema, self.training, schema_id, self.with_time
            )
            chosen: Sequence[bytes] = (
                values if whole else [values[i] for i in indexes]  # type: ignore[misc]
            )
            if isinstance(reader, JsonSchemaId):
                got, kept, failed = self._decode_json_payloads(chosen, indexes)
                decoded.append(self._columns(got))
            elif (columnar := reader.columns(chosen, indexes)) is not None:
                slot_columns, kept, failed = columnar
                decoded.append(self._slot_columns(slot_columns))
            else:
                got, kept, failed = reader.rows(chosen, indexes)
                decoded.append(self._columns(got))
            good.extend(kept)
            bad.extend(failed)
        columns = decoded[0] if len(decoded) == 1 else _Columns.concat(decoded, self._c)
        if len(groups) > 1:  # back in batch order
            order = np.argsort(np.asarray(good, dtype=np.int64), kind="stable")
            columns = columns.take(order)
            good = [good[k] for k in order]
        for i, reason in sorted(bad):
            self.bad.add(int(parts[i]), int(offs[i]), reason)
        return columns, parts[good], offs[good]

    def _decode_json_payloads(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[Any], list[int], list[tuple[int, str]]]:
        decode = self._c.decode
        events: list[Any] = []
        good: list[int] = []
        bad: list[tuple[int, str]] = []
        for value, i in zip(values, indexes, strict=True):
            try:
                events.append(decode(value[HEADER_BYTES:]))
            except msgspec.ValidationError as exc:
                bad.append((i, str(exc)))
                continue
            except msgspec.DecodeError as exc:
                bad.append((i, f"not JSON: {exc}"))
                continue
            good.append(i)
        return events, good, bad

    def _columns(self, events: list[Any]) -> _Columns:
        """The columns of decoded events (msgspec structs or registry rows)."""
        c = self._c
        return _Columns(
            numeric=_numeric_matrix(events, c),
            keys=list(map(c.key_getter, events)),
            categories=[list(map(getter, events)) for getter in c.category_getters],
            labels=list(map(c.label_getter, events)) if c.label_getter is not None else None,
            times=list(map(c.time_getter, events)) if c.time_getter is not None else None,
        )

    def _slot_columns(self, columns: list[Any]) -> _Columns:
        """The columns of a columnar registry read (one per slot, in the row layout's order)."""
        c = self._c
        keys = c.key_getter(columns)
        n, width = len(keys), len(c.numeric)
        if width == 0:
            numeric = np.empty((n, 0), dtype=np.float64)
        elif width == 1:
            numeric = np.asarray(c.numeric_getter(columns), dtype=np.float64).reshape(n, 1)
        else:
            numeric = np.column_stack(c.numeric_getter(columns)).astype(np.float64, copy=False)
        return _Columns(
            numeric=numeric,
            keys=keys,
            categories=[getter(columns) for getter in c.category_getters],
            labels=c.label_getter(columns) if c.label_getter is not None else None,
            times=c.time_getter(columns) if c.time_getter is not None else None,
        )

    def _accumulate(self, columns: _Columns, parts: np.ndarray, offs: np.ndarray) -> None:
        """Append decoded columns, after the value checks."""
        c = self._c
        n = len(columns.keys)
        if n == 0:
            return
        numeric = columns.numeric
        keep = np.ones(n, dtype=bool)
        for j in self._reject_numeric:
            for i in np.flatnonzero(np.isnan(numeric[:, j]) & keep):
                keep[i] = False
                self.bad.add(
                    int(parts[i]), int(offs[i]), f"null or missing at `{self._field(c.numeric[j])}`"
                )
        for name in self._reject_categories:
            for i, value in enumerate(columns.categories[c.categories.index(name)]):
                if value is None and keep[i]:
                    keep[i] = False
                    self.bad.add(
                        int(parts[i]), int(offs[i]), f"null or missing at `{self._field(name)}`"
                    )
        for j in c.int_columns:
            column = numeric[:, j]
            fractional = np.isfinite(column) & (column != np.trunc(column))
            for i in np.flatnonzero(fractional & keep):
                keep[i] = False
                self.bad.add(
                    int(parts[i]),
                    int(offs[i]),
                    f"Expected `int`, got `{float(column[i])!r}` - at `$.{c.numeric[j]}`",
                )
        times = None
        if columns.times is not None:
            times = self._event_times(list(columns.times), parts, offs, keep)
        keys, categories, labels = columns.keys, columns.categories, columns.labels
        if not keep.all():
            keys = list(compress(keys, keep))
            categories = [list(compress(values, keep)) for values in categories]
            labels = None if labels is None else list(compress(labels, keep))
            numeric, parts, offs = numeric[keep], parts[keep], offs[keep]
            times = times[keep] if times is not None else None
        self._numeric.append(numeric)
        self._partitions.append(parts)
        self._offsets.append(offs)
        if times is not None:
            self._times.append(times)
        # str() returns a str key itself; integer keys become their decimal text.
        if self.training or None not in keys:
            self._keys.extend(map(str, keys))
        else:
            self._keys.extend(None if k is None else str(k) for k in keys)
        for name, values in zip(c.categories, categories, strict=True):
            self._categories[name].extend(values)
        if labels is not None:
            if self.schema.task is Task.regression:
                self._regression.append(np.array(labels, dtype=np.float64))
            else:
                self._labels.extend(labels)

    def _field(self, name: str) -> str:
        return next(f.field for f in self.schema.features if f.name == name)

    def _decode_one_by_one(
        self,
        values: Sequence[bytes | None],
        partitions: Sequence[int] | np.ndarray,
        offsets: Sequence[int] | np.ndarray,
    ) -> tuple[list[Any], np.ndarray, np.ndarray]:
        decode = self._c.decode
        events: list[Any] = []
        good = []
        parts = np.asarray(partitions, dtype=np.int32)
        offs = np.asarray(offsets, dtype=np.int64)
        for i, value in enumerate(values):
            if value is None:
                self.bad.add(int(parts[i]), int(offs[i]), "empty value (a tombstone)")
                continue
            try:
                events.append(decode(value))
            except msgspec.ValidationError as exc:
                self.bad.add(int(parts[i]), int(offs[i]), str(exc))
                continue
            except msgspec.DecodeError as exc:
                self.bad.add(int(parts[i]), int(offs[i]), f"not JSON: {exc}")
                continue
            good.append(i)
        return events, parts[good], offs[good]

    def _event_times(
        self, raw: list[Any], parts: np.ndarray, offs: np.ndarray, keep: np.ndarray
    ) -> np.ndarray:
        if not any(type(v) is str for v in raw):
            times = np.array(raw, dtype=np.float64)
        else:
            times = np.empty(len(raw), dtype=np.float64)
            for i, value in enumerate(raw):
                if type(value) is not str:
                    times[i] = value
                    continue
                try:
                    moment = datetime.fromisoformat(value)
                except ValueError:
                    keep[i] = False
                    times[i] = math.nan
                    field_name = self.schema.event_time_field
                    self.bad.add(
                        int(parts[i]),
                        int(offs[i]),
                        f"Expected an ISO 8601 time or epoch number, got `{value[:40]!r}` - "
                        f"at `$.{field_name}`",
                    )
                    continue
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)  # naive times are UTC, as in snapshots
                times[i] = moment.timestamp() * 1000.0
            # Only the epoch numbers are scaled below, not the parsed strings (already in ms).
            is_number = np.fromiter((type(v) is not str for v in raw), dtype=bool, count=len(raw))
            seconds = is_number & (np.abs(times) < _SECONDS_BELOW)
            times[seconds] *= 1000.0
            return times
        times[np.abs(times) < _SECONDS_BELOW] *= 1000.0
        return times

    def result(self) -> DecodedEvents:
        """Everything decoded so far, as columns (views: decode no further batches after)."""
        labels: list[Any] | np.ndarray | None = None
        if self._c.label_getter is not None:
            if self.schema.task is Task.regression:
                labels = self._regression.view()
            else:
                labels = self._labels
        return DecodedEvents(
            schema=self.schema,
            numeric=self._numeric.view(),
            categories=self._categories,
            labels=labels,
            keys=self._keys,
            event_times=self._times.view() if self._c.time_getter is not None else None,
            partitions=self._partitions.view(),
            offsets=self._offsets.view(),
            bad=self.bad,
        )


def _numeric_matrix(events: list[Any], c: _Compiled) -> np.ndarray:
    """The numeric features of decoded events as a (rows, features) float64 matrix."""
    n, width = len(events), len(c.numeric)
    if width == 0:
        return np.empty((n, 0), dtype=np.float64)
    rows = map(c.numeric_getter, events)
    try:
        # One pass over a flat iterator: ~2x faster than numpy converting a list of tuples.
        flat = rows if width == 1 else chain.from_iterable(rows)
        return np.fromiter(flat, dtype=np.float64, count=n * width).reshape(n, width)
    except TypeError:
        # An explicit JSON null (None) somewhere in the batch: numpy's slower path maps it to NaN.
        values = list(map(c.numeric_getter, events))
        return np.array(values, dtype=np.float64).reshape(n, width)


class _Buffer:
    """A growable column (or matrix of `width` columns), filled batch by batch."""

    def __init__(self, dtype: Any, capacity: int, width: int | None = None) -> None:
        self._width = width
        self._data = np.empty(self._shape(max(capacity, 0)), dtype=dtype)
        self.size = 0

    def _shape(self, rows: int) -> tuple[int, ...]:
        return (rows,) if self._width is None else (rows, self._width)

    def append(self, chunk: np.ndarray) -> None:
        end = self.size + len(chunk)
        if end > len(self._data):
            # Doubling keeps the total copying linear in the rows decoded.
            grown = np.empty(self._shape(max(end, 2 * len(self._data), 1024)), self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = chunk
        self.size = end

    def view(self) -> np.ndarray:
        return self._data[: self.size]


def decode_events(
    schema: EventSchema | Mapping[str, Any],
    batches: Iterable[tuple[Sequence[bytes | None], Sequence[int], Sequence[int]]],
    *,
    max_bad_samples: int = DEFAULT_MAX_BAD_SAMPLES,
    expected_rows: int = 0,
) -> DecodedEvents:
    """Decode `(values, partitions, offsets)` batches (e.g. from `replay_snapshot`) for training."""
    decoder = EventDecoder(schema, max_bad_samples=max_bad_samples, expected_rows=expected_rows)
    for values, partitions, offsets in batches:
        decoder.add_batch(values, partitions, offsets)
    return decoder.result()


def check_bad_event_threshold(
    bad: BadEvents | int, total: int, threshold: float = DEFAULT_BAD_EVENT_THRESHOLD
) -> None:
    """Raise `BadEventsError` when more than `threshold` (a fraction) of `total` events are bad."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the bad-event threshold is a fraction in [0, 1], got {threshold}")
    count = bad.count if isinstance(bad, BadEvents) else bad
    if total <= 0 or count <= total * threshold:
        return
    message = (
        f"{count} of {total} events ({count / total:.2%}) are bad, above the threshold of "
        f"{threshold:.2%}"
    )
    if isinstance(bad, BadEvents) and bad.samples:
        examples = "; ".join(
            f"partition {s['partition']} offset {s['offset']}: {s['reason']}"
            for s in bad.samples[:3]
        )
        message += f". For example: {examples}"
    raise BadEventsError(message)


# --- the feature spec -------------------------------------------------------------------------


def _sort_key(value: Label) -> tuple[bool, Any]:
    # Integers before strings, each in natural order: deterministic for mixed columns.
    return (isinstance(value, str), value)


def _normalise(value: Any) -> Any:
    # true/false are the classes 1/0 (as JSON-equal values hash equal in Python anyway); an
    # integral float label (anomaly labels may be numbers) is its integer.
    if type(value) is bool:
        return int(value)
    if type(value) is float and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class FeatureSpec:
    """How events become a matrix row and a label code; serialisable, shared with the scorer."""

    schema: EventSchema
    vocabularies: dict[str, list[Label]]  # category feature -> values; code = index
    label_classes: list[Label] | None = None  # code = index; binary/anomaly: [negative, positive]
    # The feature set the model was trained with (`training.features.feature_set_record`: its
    # SQL, digest, late policy, outputs), whose outputs follow `columns` in the model's input as
    # `sql.<name>`; None: raw fields only.
    feature_set: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def _trainable(self) -> list[Feature]:
        return [f for f in self.schema.features if f.type is not FeatureType.string]

    @property
    def columns(self) -> list[str]:
        """Matrix column names: the non-string features, in schema order."""
        return [f.name for f in self._trainable]

    @property
    def model_columns(self) -> list[str]:
        """The model's input columns: `columns`, then the feature set's outputs (`sql.<name>`)."""
        if not self.feature_set:
            return self.columns
        outputs = self.feature_set.get("outputs") or []
        return [*self.columns, *(COLUMN_PREFIX + str(o["name"]) for o in outputs)]

    @property
    def categorical_columns(self) -> list[int]:
        """Indexes of the category columns in the matrix (for trainers' categorical support)."""
        return [i for i, f in enumerate(self._trainable) if f.type is FeatureType.category]

    @property
    def positive_class(self) -> Label | None:
        if self.schema.task in (Task.binary, Task.anomaly) and self.label_classes:
            return self.label_classes[-1]
        return None

    def transform(self, decoded: DecodedEvents) -> np.ndarray:
        """The float64 matrix of `decoded` (rows x `columns`), categories encoded."""
        if decoded.schema != self.schema:
            raise FeatureError("the events were decoded with a different schema than the spec's")
        columns = self.columns
        numeric_at = [j for j, f in enumerate(self._trainable) if f.type in NUMERIC_TYPES]
        if len(numeric_at) == len(columns):
            return decoded.numeric.copy()  # numeric columns only, already in schema order
        matrix = np.empty((decoded.rows, len(columns)), dtype=np.float64)
        matrix[:, numeric_at] = decoded.numeric
        for j, feature in enumerate(self._trainable):
            if feature.type is not FeatureType.category:
                continue
            name = feature.name
            codes: dict[Any, float] = {v: float(i) for i, v in enumerate(self.vocabularies[name])}
            codes[None] = math.nan
            values = decoded.categories[name]
            matrix[:, j] = np.fromiter(
                map(codes.get, values, repeat(float(UNKNOWN_CODE))),
                dtype=np.float64,
                count=len(values),
            )
        return matrix

    def encode_labels(self, decoded: DecodedEvents) -> np.ndarray | None:
        """Labels as the model sees them (None without a label field).

        binary/multiclass: int64 codes into `label_classes` (-1 = a class the spec does not know);
        regression: float64; anomaly: float64 1 = anomaly, 0 = normal, NaN = unlabeled.
        """
        if decoded.labels is None:
            return None
        if self.schema.task is Task.regression:
            return np.asarray(decoded.labels, dtype=np.float64)
        classes = self.label_classes or []
        if self.schema.task is Task.anomaly:
            positive = self.positive_class
            return np.array(
                [math.nan if v is None else float(v == positive) for v in decoded.labels],
                dtype=np.float64,
            )
        index = {value: i for i, value in enumerate(classes)}
        labels = decoded.labels
        return np.fromiter(map(index.get, labels, repeat(-1)), dtype=np.int64, count=len(labels))

    def encode_values(
        self,
        values: Sequence[bytes | None],
        partitions: Sequence[int] | None = None,
        offsets: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, DecodedEvents]:
        """Encode live events (no label or event time needed) exactly as in training.

        Returns the matrix of the good events and the decoded events, whose `offsets` say which
        input each row came from (the position in `values` when no offsets are given).
        """
        decoder = EventDecoder(self.schema, training=False)
        positions = range(len(values)) if offsets is None else offsets
        decoder.add_batch(values, partitions or [-1] * len(values), positions)
        decoded = decoder.result()
        return self.transform(decoded), decoded

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "schema": schema_as_dict(self.schema),
            "columns": self.columns,
            "vocabularies": {name: list(v) for name, v in self.vocabularies.items()},
            "label_classes": None if self.label_classes is None else list(self.label_classes),
            "positive_class": self.positive_class,
            "unknown_category_code": UNKNOWN_CODE,
            "missing_value": "NaN",
        } | ({} if self.feature_set is None else {"feature_set": dict(self.feature_set)})

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        if data.get("format") != SPEC_FORMAT:
            raise FeatureError(f"unsupported feature spec format {data.get('format')!r}")
        schema = as_event_schema(data["schema"])
        categories = {f.name for f in schema.features if f.type is FeatureType.category}
        vocabularies = {name: list(v) for name, v in data["vocabularies"].items()}
        if set(vocabularies) != categories:
            raise FeatureError("the feature spec's vocabularies do not match its category features")
        classes = data.get("label_classes")
        feature_set = data.get("feature_set")
        if feature_set is not None and not isinstance(feature_set, Mapping):
            raise FeatureError("the feature spec's feature_set is not an object")
        return cls(
            schema,
            vocabularies,
            None if classes is None else list(classes),
            None if feature_set is None else dict(feature_set),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> FeatureSpec:
        return cls.from_dict(orjson.loads(raw))


def fit_feature_spec(
    decoded: DecodedEvents,
    train_mask: np.ndarray | None = None,
    *,
    max_categories: int | None = None,
    positive_class: Label | None = None,
) -> FeatureSpec:
    """Learn the category vocabularies on the training rows and the label classes on all rows.

    Vocabularies use only `train_mask` rows, so the holdout is encoded as unseen live data would be
    (a holdout-only value is unknown). Label classes use every row, so a class present only in the
    holdout still has a code for evaluation. `max_categories` keeps the most frequent values
    (e.g. 254 for histogram gradient boosting); the rest are unknown. For binary (and labeled
    anomaly) tasks the positive class is `positive_class`, else 1 for 0/1 or false/true labels,
    else the last in sorted order.
    """
    if max_categories is not None and max_categories < 1:
        raise ValueError("max_categories must be at least 1")
    schema = decoded.schema
    if train_mask is not None and len(train_mask) != decoded.rows:
        raise ValueError(f"train_mask has {len(train_mask)} entries for {decoded.rows} rows")
    vocabularies = {}
    for name, values in decoded.categories.items():
        rows = values if train_mask is None else compress(values, train_mask)
        counts: Counter[Any] = Counter()
        for value, count in Counter(rows).items():
            if value is not None:
                counts[_normalise(value)] += count
        chosen = sorted(counts, key=lambda v: (-counts[v], _sort_key(v)))[:max_categories]
        vocabularies[name] = sorted(chosen, key=_sort_key)
    return FeatureSpec(schema, vocabularies, _label_classes(decoded, positive_class))


def _label_classes(decoded: DecodedEvents, positive_class: Label | None) -> list[Label] | None:
    schema = decoded.schema
    if decoded.labels is None or schema.task is Task.regression:
        return None
    seen = {_normalise(v) for v in set(decoded.labels) if v is not None}
    classes = sorted(seen, key=_sort_key)
    field_name = schema.label_field
    if schema.task is Task.multiclass:
        if len(classes) < 2:
            raise FeatureError(
                f"label '{field_name}' has {len(classes)} class(es) ({classes}): multiclass "
                "training needs at least 2"
            )
        return classes
    if positive_class is not None:
        positive = _normalise(positive_class)
        if positive not in seen and schema.task is Task.binary:
            raise FeatureError(
                f"positive class {positive_class!r} never occurs in label '{field_name}' "
                f"(classes: {classes[:10]})"
            )
    elif seen <= {0, 1}:
        positive = 1
    else:
        positive = classes[-1]
    negatives = sorted(seen - {positive}, key=_sort_key)
    if len(negatives) > 1:
        raise FeatureError(
            f"label '{field_name}' has {len(seen)} classes ({classes[:10]}): a {schema.task} "
            "label takes 2 values (declare the task as multiclass)"
        )
    if schema.task is Task.binary and not negatives:
        raise FeatureError(
            f"label '{field_name}' has a single class ({classes}) in {decoded.rows} events: "
            "binary training needs both classes"
        )
    if negatives:
        return [negatives[0], positive]
    # Anomaly labels with only the positive value seen: every other value is normal.
    return [0, positive] if positive == 1 else [positive]
