"""Avro, Protobuf and JSON Schema records: each read with the writer schema its id names.

A dataset's fields (the key, event time, label and features, each a path such as
`payment.amount`) are resolved once per (dataset schema, writer schema id) against the writer
schema: a field the writer does not have reads the feature's default (the reader schema's default
recorded when the dataset was checked) or a missing value; a field whose type no longer fits makes
every record of that id a bad event with the reason. Avro batches are then read column by column,
all records of a writer schema at once (`carrara.streams.avro_columns`, one column per field of
the row layout); Protobuf records (protobuf's upb parser) and the Avro batches the columnar reader
declines (arrays or maps in the schema, a malformed record: fastavro's C reader names the reason)
are decoded record by record and projected onto the fields into one tuple per record,
`(key, [event time], [label], *features)`, the row layout the event codec turns into columns.

The same resolution checks a dataset against its subject's latest schema
(`check_registered_schema`), naming each missing or mistyped field.

Why one module of ~860 lines: the three formats share one resolution of the slots against a writer
schema (the types each slot accepts, defaults, null checks, the reasons a record is bad) and one
reader cache, and the dataset check runs that same resolution; the columnar Avro decoding, which
needs none of it, lives apart (`carrara.streams.avro_columns`).
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from itertools import compress
from operator import attrgetter, itemgetter
from typing import Any

import fastavro
import numpy as np
import orjson
from confluent_kafka.schema_registry import Schema
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict

from carrara.streams.avro_columns import plan_columns
from carrara.streams.event_schema import EventFormat, EventSchema, FieldMismatch, Task
from carrara.streams.schema_registry import (
    HEADER_BYTES,
    MAGIC,
    Registry,
    SchemaNotFound,
)

NO_FRAMING = "no Schema Registry framing (magic byte 0 and a 4-byte schema id)"
TOMBSTONE = "empty value (a tombstone)"

# What a slot accepts, in each format's type names.
_AVRO_OK: dict[str, set[str]] = {
    "float": {"int", "long", "float", "double"},
    "int": {"int", "long"},
    "bool": {"boolean"},
    "category": {"string", "enum", "int", "long", "boolean"},
    "string": {"string", "enum"},
    "key": {"string", "int", "long"},
    "time": {"int", "long", "float", "double", "string"},
    "label-class": {"string", "enum", "int", "long", "boolean"},
    "label-number": {"int", "long", "float", "double"},
    "label-any": {"string", "enum", "int", "long", "float", "double", "boolean"},
}
_PROTO_OK: dict[str, set[str]] = {
    "float": {"int", "float"},
    "int": {"int"},
    "bool": {"bool"},
    "category": {"string", "enum", "int", "bool"},
    "string": {"string", "enum"},
    "key": {"string", "int"},
    "time": {"int", "float", "string"},
    "label-class": {"string", "enum", "int", "bool"},
    "label-number": {"int", "float"},
    "label-any": {"string", "enum", "int", "float", "bool"},
}
_JSON_OK: dict[str, set[str]] = {
    "float": {"number", "integer"},
    "int": {"integer"},
    "bool": {"boolean"},
    "category": {"string", "integer", "boolean"},
    "string": {"string"},
    "key": {"string", "integer"},
    "time": {"string", "number", "integer"},
    "label-class": {"string", "integer", "boolean"},
    "label-number": {"number", "integer"},
    "label-any": {"string", "number", "integer", "boolean"},
}
EXPECTED: dict[str, str] = {
    "float": "float (a number)",
    "int": "int (an integer)",
    "bool": "bool (a boolean)",
    "category": "category (a string, enum, integer or boolean)",
    "string": "string",
    "key": "key (a string or integer)",
    "time": "event time (a timestamp, epoch number or ISO 8601 string)",
    "label-class": "class label (a string, enum, integer or boolean)",
    "label-number": "regression target (a number)",
    "label-any": "label (a boolean, number or string)",
}
_LABEL_KIND = {
    Task.binary: "label-class",
    Task.multiclass: "label-class",
    Task.regression: "label-number",
    Task.anomaly: "label-any",
}


@dataclass(frozen=True)
class Slot:
    """One value of the row: where it is read from and what it must be."""

    path: str
    kind: str
    required: bool  # a null makes the event bad
    default: Any = None  # read when the writer schema has no such field


def slots(schema: EventSchema, training: bool, with_time: bool | None = None) -> list[Slot]:
    """The row layout of `schema`: key, [event time], [label] (training only), features.

    The event time is read when training, or when `with_time` says so (a scorer computing a
    feature set).
    """
    out = [Slot(schema.key_field, "key", training)]
    if (training if with_time is None else with_time) and schema.event_time_field:
        out.append(Slot(schema.event_time_field, "time", True))
    if training and schema.label_field:
        out.append(
            Slot(schema.label_field, _LABEL_KIND[schema.task], schema.task is not Task.anomaly)
        )
    out.extend(Slot(f.field, str(f.type), False, f.default) for f in schema.features)
    return out


class SlotMismatch(ValueError):
    """A slot's field has a type the slot cannot read (in one writer schema)."""


# --- Avro -----------------------------------------------------------------------------------

_AVRO_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _avro_names(node: Any, names: dict[str, Any], namespace: str = "") -> None:
    """Every named type of an Avro schema, by its short and full name."""
    if isinstance(node, list):
        for member in node:
            _avro_names(member, names, namespace)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        ns = node.get("namespace", namespace)
        name = node["name"]
        names[name] = node
        names[f"{ns}.{name}" if ns and "." not in name else name] = node
        namespace = ns
    for field in node.get("fields", []) if kind in ("record", "error") else []:
        _avro_names(field["type"], names, namespace)
    for key in ("items", "values"):
        if key in node:
            _avro_names(node[key], names, namespace)
    if isinstance(kind, (dict, list)):
        _avro_names(kind, names, namespace)


def _avro_resolve(node: Any, names: dict[str, Any]) -> tuple[str, bool, Any]:
    """(type name, nullable, node) of an Avro type, through named references and null unions."""
    nullable = False
    if isinstance(node, list):
        members = [m for m in node if m != "null"]
        nullable = len(members) < len(node)
        if len(members) != 1:
            return ("union", nullable, node)
        node = members[0]
    if isinstance(node, str) and node not in _AVRO_PRIMITIVES:
        node = names.get(node, node)
    if isinstance(node, dict):
        kind = node["type"]
        if isinstance(kind, (dict, list)) or (isinstance(kind, str) and kind in names):
            inner, inner_null, inner_node = _avro_resolve(kind, names)
            return (inner, nullable or inner_null, inner_node)
        if kind == "error":
            kind = "record"
        return (str(kind), nullable, node)
    return (str(node), nullable, node)


@dataclass(frozen=True)
class _Route:
    """How one slot is read from one writer schema."""

    keys: tuple[str, ...] | None  # None: the writer has no such field
    nullable: bool
    convert: Callable[[Any], Any] | None = None


def _timestamp_ms(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp() * 1000.0
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp() * 1000.0
    return value


def _avro_route(root: dict[str, Any], names: dict[str, Any], slot: Slot) -> _Route:
    node: Any = root
    nullable = False
    parts = slot.path.split(".")
    for depth, part in enumerate(parts):
        fields = {f["name"]: f for f in node.get("fields", [])}
        if part not in fields:
            return _Route(None, True)
        kind, null, resolved = _avro_resolve(fields[part]["type"], names)
        nullable = nullable or null
        if depth < len(parts) - 1:
            if kind != "record":
                raise SlotMismatch(f"`{'.'.join(parts[: depth + 1])}` is {kind}, not a record")
            node = resolved
            continue
        if kind not in _AVRO_OK[slot.kind]:
            raise SlotMismatch(f"expected {EXPECTED[slot.kind]}, the schema has {kind}")
        logical = resolved.get("logicalType") if isinstance(resolved, dict) else None
        convert = (
            _timestamp_ms if logical and str(logical).startswith(("timestamp", "date")) else None
        )
        return _Route(tuple(parts), nullable, convert)
    raise SlotMismatch("empty path")


def _avro_default(root: dict[str, Any], names: dict[str, Any], path: str) -> Any:
    node: Any = root
    parts = path.split(".")
    for depth, part in enumerate(parts):
        fields = {f["name"]: f for f in node.get("fields", [])}
        if part not in fields:
            return None
        if depth == len(parts) - 1:
            value = fields[part].get("default")
            return value if isinstance(value, (int, float, str, bool)) else None
        node = _avro_resolve(fields[part]["type"], names)[2]
    return None


# --- Protobuf -------------------------------------------------------------------------------

_WRAPPERS = {
    "google.protobuf.DoubleValue": "float",
    "google.protobuf.FloatValue": "float",
    "google.protobuf.Int64Value": "int",
    "google.protobuf.UInt64Value": "int",
    "google.protobuf.Int32Value": "int",
    "google.protobuf.UInt32Value": "int",
    "google.protobuf.BoolValue": "bool",
    "google.protobuf.StringValue": "string",
}
_CPP_KIND = {
    FieldDescriptor.CPPTYPE_INT32: "int",
    FieldDescriptor.CPPTYPE_INT64: "int",
    FieldDescriptor.CPPTYPE_UINT32: "int",
    FieldDescriptor.CPPTYPE_UINT64: "int",
    FieldDescriptor.CPPTYPE_DOUBLE: "float",
    FieldDescriptor.CPPTYPE_FLOAT: "float",
    FieldDescriptor.CPPTYPE_BOOL: "bool",
    FieldDescriptor.CPPTYPE_ENUM: "enum",
    FieldDescriptor.CPPTYPE_STRING: "string",
    FieldDescriptor.CPPTYPE_MESSAGE: "message",
}


def proto_file(schema_str: str) -> descriptor_pb2.FileDescriptorProto:
    """The file descriptor of a registered Protobuf schema (a serialized descriptor, base64).

    That is how confluent-kafka's ProtobufSerializer registers schemas; a schema registered as
    .proto text cannot be compiled here (ValueError says so).
    """
    try:
        raw = base64.b64decode(schema_str.encode("ascii"), validate=True)
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    except Exception as exc:
        raise ValueError(
            "the Protobuf schema is .proto text: Carrara reads Protobuf schemas registered as "
            "serialized file descriptors (base64), as confluent-kafka's ProtobufSerializer "
            "registers them"
        ) from exc
    if not file.message_type:
        raise ValueError("the Protobuf schema defines no message")
    return file


def _proto_pool(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for dependency in file.dependency:
        if not dependency.startswith("google/protobuf/"):
            raise ValueError(f"schema references ({dependency}) are not supported")
        module = dependency.removeprefix("google/protobuf/").removesuffix(".proto") + "_pb2"
        well_known = __import__(f"google.protobuf.{module}", fromlist=["DESCRIPTOR"])
        pool.AddSerializedFile(well_known.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return pool


def _message_at(
    pool: descriptor_pool.DescriptorPool, file: descriptor_pb2.FileDescriptorProto, indexes: tuple
) -> Descriptor:
    prefix = f"{file.package}." if file.package else ""
    descriptor = pool.FindMessageTypeByName(prefix + file.message_type[indexes[0]].name)
    for index in indexes[1:]:
        descriptor = descriptor.nested_types[index]
    return descriptor


def _proto_kind(field: FieldDescriptor) -> tuple[str, bool, str | None]:
    """(kind, has presence, wrapper kind) of a Protobuf field."""
    presence = bool(getattr(field, "has_presence", False))
    kind = _CPP_KIND.get(field.cpp_type, "unknown")
    if kind == "string" and field.type == FieldDescriptor.TYPE_BYTES:
        kind = "bytes"
    if kind == "message" and field.message_type is not None:
        wrapped = _WRAPPERS.get(field.message_type.full_name)
        if wrapped is not None:
            return (wrapped, True, wrapped)
    return (kind, presence, None)


def _is_repeated(field: FieldDescriptor) -> bool:
    return getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED


def _proto_getter(message: Descriptor, slot: Slot) -> tuple[Callable[[Any], Any] | None, bool]:
    """A function reading `slot` from a message of type `message` (None: no such field)."""
    parts = slot.path.split(".")
    chain: list[str] = []
    descriptor = message
    for depth, part in enumerate(parts):
        field = descriptor.fields_by_name.get(part)
        if field is None:
            return (None, True)
        kind, presence, wrapper = _proto_kind(field)
        if _is_repeated(field):
            raise SlotMismatch(f"`{'.'.join(parts[: depth + 1])}` is a repeated field")
        if depth < len(parts) - 1:
            if kind != "message":
                raise SlotMismatch(f"`{'.'.join(parts[: depth + 1])}` is {kind}, not a message")
            chain.append(part)
            if field.message_type is None:
                raise SlotMismatch(f"`{'.'.join(parts[: depth + 1])}` has no message type")
            descriptor = field.message_type
            continue
        if kind not in _PROTO_OK[slot.kind]:
            raise SlotMismatch(f"expected {EXPECTED[slot.kind]}, the schema has {kind}")
        enum_type = field.enum_type if kind == "enum" else None
        enum_names = {v.number: v.name for v in enum_type.values} if enum_type else None
        # A category or string reads an enum by its name; a number reads its number.
        as_name = enum_names if slot.kind in ("category", "string", "label-class") else None
        nullable = presence or bool(chain)
        return (_proto_reader(tuple(chain), part, presence, wrapper, as_name), nullable)
    raise SlotMismatch("empty path")


def _proto_reader(
    chain: tuple[str, ...],
    name: str,
    presence: bool,
    wrapper: str | None,
    enum_names: dict[int, str] | None,
) -> Callable[[Any], Any]:
    if not chain and not presence and wrapper is None and enum_names is None:
        return _AttrGetter(name)

    def read(message: Any) -> Any:
        for part in chain:
            if not message.HasField(part):
                return None
            message = getattr(message, part)
        if presence and not message.HasField(name):
            return None
        value = getattr(message, name)
        if wrapper is not None:
            value = value.value
        if enum_names is not None:
            value = enum_names.get(value, value)
        return value

    return read


class _AttrGetter:
    """`getattr(message, name)` as a plain attribute read (marks the fast path)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, message: Any) -> Any:
        return getattr(message, self.name)


# --- readers --------------------------------------------------------------------------------

Bad = list[tuple[int, str]]  # (index in the batch, reason)


class Reader:
    """Decodes the records of one writer schema id into rows (and the reasons of the bad ones)."""

    def rows(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[tuple], list[int], Bad]:
        raise NotImplementedError

    def columns(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[Any], list[int], Bad] | None:
        """One column per slot (see `avro_columns`), or None: use `rows`."""
        return None


@dataclass
class _Refused(Reader):
    """Every record of this id is bad, for one reason."""

    reason: str

    def rows(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[tuple], list[int], Bad]:
        return [], [], [(i, self.reason) for i in indexes]


def _null_checks(slots_: list[Slot], nullable: list[bool]) -> list[tuple[int, str]]:
    return [(j, s.path) for j, s in enumerate(slots_) if s.required and nullable[j]]


def _check_nulls(
    rows: list[tuple], good: list[int], checks: list[tuple[int, str]], bad: Bad
) -> tuple[list[tuple], list[int]]:
    if not checks:
        return rows, good
    keep_rows, keep_good = [], []
    for row, i in zip(rows, good, strict=True):
        for j, path in checks:
            if row[j] is None:
                bad.append((i, f"null or missing at `{path}`"))
                break
        else:
            keep_rows.append(row)
            keep_good.append(i)
    return keep_rows, keep_good


class AvroReader(Reader):
    def __init__(self, schema_id: int, writer: dict[str, Any], slots_: list[Slot]) -> None:
        self.schema_id = schema_id
        self.parsed = fastavro.parse_schema(writer)
        names: dict[str, Any] = {}
        _avro_names(writer, names)
        routes = []
        for slot in slots_:
            try:
                route = _avro_route(writer, names, slot)
            except SlotMismatch as exc:
                raise SlotMismatch(
                    f"field `{slot.path}` in writer schema {schema_id}: {exc}"
                ) from exc
            if route.keys is None and slot.required:
                raise SlotMismatch(f"writer schema {schema_id} has no field `{slot.path}`")
            routes.append(route)
        self.checks = _null_checks(slots_, [r.nullable for r in routes])
        self.plan = plan_columns(
            writer,
            names,
            [r.keys for r in routes],
            [slot.kind for slot in slots_],
            [slot.default for slot in slots_],
        )
        flat = all(r.keys is not None and len(r.keys) == 1 and r.convert is None for r in routes)
        if flat:
            self.project: Callable[[dict[str, Any]], tuple] = itemgetter(
                *(r.keys[0] for r in routes if r.keys is not None)
            )
        else:
            plan = [
                (r.keys, slot.default, r.convert) for r, slot in zip(routes, slots_, strict=True)
            ]

            def project(record: dict[str, Any]) -> tuple:
                out = []
                for keys, default, convert in plan:
                    if keys is None:
                        out.append(default)
                        continue
                    value: Any = record
                    for key in keys:
                        value = value.get(key) if value is not None else None
                    if convert is not None and value is not None:
                        value = convert(value)
                    out.append(value)
                return tuple(out)

            self.project = project

    def rows(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[tuple], list[int], Bad]:
        read = fastavro.schemaless_reader
        parsed = self.parsed
        project = self.project
        rows: list[tuple] = []
        good: list[int] = []
        bad: Bad = []
        buffer = io.BytesIO
        for value, i in zip(values, indexes, strict=True):
            stream = buffer(value)
            stream.seek(HEADER_BYTES)
            try:
                rows.append(project(read(stream, parsed, None)))  # pyright: ignore[reportArgumentType]
            except Exception as exc:
                bad.append((i, f"not Avro of writer schema {self.schema_id}: {exc}"[:300]))
                continue
            good.append(i)
        rows, good = _check_nulls(rows, good, self.checks, bad)
        return rows, good, bad

    def columns(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[Any], list[int], Bad] | None:
        if self.plan is None:
            return None
        columns = self.plan.read(values, HEADER_BYTES)
        if columns is None:  # some record is malformed: record by record, with the reasons
            return None
        good = list(indexes)
        bad: Bad = []
        if not self.checks:
            return columns, good, bad
        n = len(good)
        keep = np.ones(n, dtype=bool)
        for j, path in self.checks:
            column = columns[j]
            if isinstance(column, np.ndarray):
                nulls = np.isnan(column)
            else:
                nulls = np.fromiter((v is None for v in column), dtype=bool, count=n)
            for k in np.flatnonzero(nulls & keep):
                keep[k] = False
                bad.append((good[k], f"null or missing at `{path}`"))
        if bad:
            good = list(compress(good, keep))
            columns = [
                c[keep] if isinstance(c, np.ndarray) else list(compress(c, keep)) for c in columns
            ]
        return columns, good, bad


class ProtobufReader(Reader):
    def __init__(self, schema_id: int, schema_str: str, slots_: list[Slot]) -> None:
        self.schema_id = schema_id
        self.slots = slots_
        self.file = proto_file(schema_str)
        self.pool = _proto_pool(self.file)
        self._by_indexes: dict[tuple, tuple[Any, Callable[[Any], tuple], list] | str] = {}
        self._lock = threading.Lock()
        self._compile((0,))  # the first message: fails early when it does not fit

    def _compile(self, indexes: tuple) -> tuple[Any, Callable[[Any], tuple], list] | str:
        found = self._by_indexes.get(indexes)
        if found is not None:
            return found
        try:
            descriptor = _message_at(self.pool, self.file, indexes)
        except (IndexError, KeyError) as exc:
            result: Any = f"writer schema {self.schema_id} has no message at {list(indexes)}"
            with self._lock:
                self._by_indexes[indexes] = result
            raise SlotMismatch(result) from exc
        getters = []
        nullable = []
        for slot in self.slots:
            try:
                getter, null = _proto_getter(descriptor, slot)
            except SlotMismatch as exc:
                raise SlotMismatch(
                    f"field `{slot.path}` in writer schema {self.schema_id}: {exc}"
                ) from exc
            if getter is None and slot.required:
                raise SlotMismatch(f"writer schema {self.schema_id} has no field `{slot.path}`")
            getters.append((getter, slot.default))
            nullable.append(null)
        cls = message_factory.GetMessageClass(descriptor)
        project: Callable[[Any], tuple]
        if all(isinstance(g, _AttrGetter) for g, _ in getters):
            project = attrgetter(*(g.name for g, _ in getters if isinstance(g, _AttrGetter)))
        else:
            plan = tuple(getters)

            def read_all(message: Any) -> tuple:
                return tuple(default if g is None else g(message) for g, default in plan)

            project = read_all

        compiled = (cls, project, _null_checks(self.slots, nullable))
        with self._lock:
            self._by_indexes[indexes] = compiled
        return compiled

    def rows(
        self, values: Sequence[bytes], indexes: Sequence[int]
    ) -> tuple[list[tuple], list[int], Bad]:
        rows: list[tuple] = []
        good: list[int] = []
        bad: Bad = []
        first = self._compile((0,))
        assert not isinstance(first, str)
        checks = first[2]
        for value, i in zip(values, indexes, strict=True):
            try:
                if value[HEADER_BYTES] == 0:  # the usual [0]: the first message
                    compiled, start = first, HEADER_BYTES + 1
                else:
                    message_indexes, start = _message_indexes(value, HEADER_BYTES)
                    compiled = self._compile(message_indexes)
                    if isinstance(compiled, str):
                        bad.append((i, compiled))
                        continue
                    checks = compiled[2]
                cls, project, _ = compiled
                rows.append(project(cls.FromString(value[start:])))
            except SlotMismatch as exc:
                bad.append((i, str(exc)))
                continue
            except Exception as exc:
                bad.append((i, f"not Protobuf of writer schema {self.schema_id}: {exc}"[:300]))
                continue
            good.append(i)
        rows, good = _check_nulls(rows, good, checks, bad)
        return rows, good, bad


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _zigzag(data: bytes, pos: int) -> tuple[int, int]:
    raw, pos = _varint(data, pos)
    return (raw >> 1) ^ -(raw & 1), pos


def _message_indexes(data: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    count, pos = _zigzag(data, pos)
    if count == 0:
        return (0,), pos
    if count < 0 or count > 100:
        raise ValueError(f"bad message index count {count}")
    indexes = []
    for _ in range(count):
        index, pos = _zigzag(data, pos)
        indexes.append(index)
    return tuple(indexes), pos


# Compiled readers, per (registry, dataset schema, training, writer schema id, with time).
_readers: dict[tuple[str, EventSchema, bool, int, bool | None], Reader] = {}
_readers_lock = threading.Lock()
_MAX_READERS = 512


def reader_for(
    registry: Registry,
    schema: EventSchema,
    training: bool,
    schema_id: int,
    with_time: bool | None = None,
) -> Reader:
    """The compiled reader of `schema_id` for `schema` (cached); RegistryUnavailable propagates.

    `with_time`: read the event time (default: when training), see `slots`.
    """
    key = (registry.url or str(id(registry)), schema, training, schema_id, with_time)
    found = _readers.get(key)
    if found is not None:
        return found
    try:
        registered = registry.writer_schema(schema_id)
    except SchemaNotFound:
        # Not cached here: the registry remembers unknown ids for a few seconds only.
        return _Refused(f"unknown schema id {schema_id} (not in the Schema Registry)")
    reader = compile_reader(schema, training, schema_id, registered, with_time)
    with _readers_lock:
        if len(_readers) >= _MAX_READERS:
            _readers.clear()
        _readers[key] = reader
    return reader


def compile_reader(
    schema: EventSchema,
    training: bool,
    schema_id: int,
    registered: Schema,
    with_time: bool | None = None,
) -> Reader:
    """A reader of records written with `registered` (id `schema_id`) for `schema`."""
    wanted = {
        EventFormat.avro: "AVRO",
        EventFormat.protobuf: "PROTOBUF",
        EventFormat.json_schema: "JSON",
    }[schema.format]
    kind = (registered.schema_type or "AVRO").upper()
    if kind != wanted:
        return _Refused(
            f"schema id {schema_id} is a {kind} schema, the dataset reads {schema.format}"
        )
    layout = slots(schema, training, with_time)
    try:
        if schema.format is EventFormat.avro:
            return AvroReader(schema_id, orjson.loads(registered.schema_str or "null"), layout)
        if schema.format is EventFormat.protobuf:
            return ProtobufReader(schema_id, registered.schema_str or "", layout)
    except (SlotMismatch, ValueError) as exc:
        return _Refused(str(exc))
    except Exception as exc:  # an unparsable writer schema
        return _Refused(f"writer schema {schema_id} cannot be read: {exc}"[:300])
    return JsonSchemaId()


class JsonSchemaId(Reader):
    """JSON Schema records are decoded by the JSON codec; this only says the id is known."""


_HEAD = itemgetter(slice(0, HEADER_BYTES))


def split_by_schema_id(
    values: Sequence[bytes | None],
) -> tuple[dict[int, list[int]], Bad]:
    """Batch indexes per writer schema id, and the records without the framing."""
    n = len(values)
    try:  # every record framed (the usual batch): the headers are checked together
        shortest = min(map(len, values), default=0)  # pyright: ignore[reportArgumentType]
        heads = b"".join(map(_HEAD, values))  # pyright: ignore[reportArgumentType]
    except TypeError:  # a tombstone
        shortest = 0
    if shortest > HEADER_BYTES:
        framing = np.frombuffer(heads, dtype=np.uint8).reshape(n, HEADER_BYTES)
        if not (framing[:, 0] != MAGIC).any():
            ids = framing[:, 1:].copy().view(">u4").ravel()
            if (ids == ids[0]).all():
                return {int(ids[0]): list(range(n))}, []
            return {int(i): np.flatnonzero(ids == i).tolist() for i in np.unique(ids)}, []
    groups: dict[int, list[int]] = {}
    bad: Bad = []
    for i, value in enumerate(values):
        if value is None:
            bad.append((i, TOMBSTONE))
        elif len(value) <= HEADER_BYTES or value[0] != MAGIC:
            bad.append((i, NO_FRAMING))
        else:
            groups.setdefault(int.from_bytes(value[1:HEADER_BYTES], "big"), []).append(i)
    return groups, bad


# --- checking a dataset against its subject's schema ------------------------------------------


def _json_schema_type(node: Any) -> tuple[str, bool]:
    kind = node.get("type") if isinstance(node, dict) else None
    if isinstance(kind, list):
        members = [k for k in kind if k != "null"]
        return (members[0] if len(members) == 1 else "union", len(members) < len(kind))
    return (str(kind), False)


def _json_schema_field(root: Any, path: str) -> dict[str, Any] | None:
    node: Any = root
    for part in path.split("."):
        props = node.get("properties", {}) if isinstance(node, dict) else {}
        if part not in props:
            return None
        node = props[part]
    return node


def check_registered_schema(
    schema: EventSchema, registered: Schema
) -> tuple[list[FieldMismatch], dict[str, Any]]:
    """Fields of `schema` that `registered` (the subject's latest schema) lacks or mistypes, and
    the defaults it declares for the features (by path)."""
    layout = slots(schema, training=True)
    mismatches: list[FieldMismatch] = []
    defaults: dict[str, Any] = {}
    kind = (registered.schema_type or "AVRO").upper()
    names: dict[str, Any] = {}
    root: Any = None
    message: Descriptor | None = None
    try:
        if schema.format is EventFormat.avro and kind == "AVRO":
            root = orjson.loads(registered.schema_str or "null")
            _avro_names(root, names)
            if not isinstance(root, dict) or root.get("type") != "record":
                raise ValueError("the Avro schema is not a record")
        elif schema.format is EventFormat.protobuf and kind == "PROTOBUF":
            file = proto_file(registered.schema_str or "")
            message = _message_at(_proto_pool(file), file, (0,))
        elif schema.format is EventFormat.json_schema and kind == "JSON":
            root = orjson.loads(registered.schema_str or "null")
        else:
            raise ValueError(
                f"the subject's schema is {kind}, the dataset declares {schema.format}"
            )
    except ValueError as exc:
        return [FieldMismatch("(schema)", str(schema.format), str(exc), 0)], {}
    for slot in layout:
        expected = EXPECTED[slot.kind]
        try:
            if root is not None and schema.format is EventFormat.avro:
                route = _avro_route(root, names, slot)
                missing = route.keys is None
                default = _avro_default(root, names, slot.path)
                if default is not None:
                    defaults[slot.path] = default
            elif message is not None:
                getter, _ = _proto_getter(message, slot)
                missing = getter is None
            else:
                node = _json_schema_field(root, slot.path)
                missing = node is None
                if node is not None:
                    found, _ = _json_schema_type(node)
                    if found not in _JSON_OK[slot.kind]:
                        raise SlotMismatch(f"expected {expected}, the schema has {found}")
        except SlotMismatch as exc:
            mismatches.append(FieldMismatch(slot.path, expected, str(exc), 0))
            continue
        if missing:
            mismatches.append(
                FieldMismatch(
                    slot.path,
                    expected,
                    f"the subject's latest schema has no field `{slot.path}`",
                    0,
                )
            )
    return mismatches, defaults


# --- showing a record -----------------------------------------------------------------------


def decode_for_display(
    registry: Registry, fmt: EventFormat, value: bytes | None
) -> tuple[dict[str, Any] | None, int | None, str | None]:
    """A framed record as a dict (every field of its writer schema), its schema id, or why not.

    For people (the UI's live sample), not for the hot path. RegistryUnavailable propagates.
    """
    if value is None:
        return None, None, TOMBSTONE
    if len(value) <= HEADER_BYTES or value[0] != MAGIC:
        return None, None, NO_FRAMING
    schema_id = int.from_bytes(value[1:HEADER_BYTES], "big")
    try:
        registered = registry.writer_schema(schema_id)
    except SchemaNotFound:
        return None, schema_id, f"unknown schema id {schema_id} (not in the Schema Registry)"
    try:
        if fmt is EventFormat.avro:
            parsed = fastavro.parse_schema(orjson.loads(registered.schema_str or "null"))
            stream = io.BytesIO(value)
            stream.seek(HEADER_BYTES)
            record = fastavro.schemaless_reader(stream, parsed, None)
            return orjson.loads(orjson.dumps(record, default=str)), schema_id, None
        if fmt is EventFormat.protobuf:
            file = proto_file(registered.schema_str or "")
            indexes, start = _message_indexes(value, HEADER_BYTES)
            descriptor = _message_at(_proto_pool(file), file, indexes)
            message = message_factory.GetMessageClass(descriptor).FromString(value[start:])
            return MessageToDict(message, preserving_proto_field_name=True), schema_id, None
        decoded = orjson.loads(value[HEADER_BYTES:])
        if not isinstance(decoded, dict):
            return None, schema_id, "not a JSON object"
        return decoded, schema_id, None
    except Exception as exc:
        return None, schema_id, f"cannot decode with writer schema {schema_id}: {exc}"[:300]
