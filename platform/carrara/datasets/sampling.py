"""A live sample of a dataset's topic: its newest events, each checked against the schema."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from confluent_kafka import KafkaException
from sqlalchemy.orm import Session

from carrara.datasets.service import event_schema, get_dataset
from carrara.models import Dataset
from carrara.streams.event_codec import EventDecoder
from carrara.streams.event_schema import REGISTRY_FORMATS, decode_event, validate_events
from carrara.streams.registry_formats import decode_for_display
from carrara.streams.schema_registry import (
    Registry,
    RegistryUnavailable,
    SchemaNotFound,
    default_registry,
)
from carrara.streams.snapshot import SampledEvent, TopicNotFound, read_recent_events

SAMPLE_SIZE = 20
SAMPLE_TIMEOUT_S = 5.0
MAX_SHOWN_BYTES = 2000


@dataclass
class SampleRow:
    """One recent event of the topic, as the sample panel shows it."""

    partition: int
    offset: int
    timestamp_ms: int | None
    key_text: str
    value_text: str
    mismatches: list[str]


@dataclass
class TopicSample:
    """The newest events of a dataset's topic, or why Kafka could not give them."""

    dataset: Dataset
    rows: list[SampleRow] = field(default_factory=list)
    problem: str = ""


def _registry_rows(
    dataset: Dataset, events: list[SampledEvent], registry: Registry
) -> list[SampleRow]:
    """Framed records decoded with their writer schema; what training would say of each."""
    schema = event_schema(dataset)
    rows = []
    for event in events:
        record, schema_id, problem = decode_for_display(registry, schema.format, event.value)
        decoder = EventDecoder(schema, registry=registry)
        decoder.add_batch([event.value], [event.partition], [event.offset])
        reasons = [str(s["reason"]) for s in decoder.result().bad.samples]
        if record is not None:
            shown = orjson.dumps(record, option=orjson.OPT_INDENT_2, default=str).decode()
            shown = f"// writer schema id {schema_id}\n{shown}"
        else:
            shown = problem or ""
        if len(shown) > MAX_SHOWN_BYTES:
            shown = shown[:MAX_SHOWN_BYTES] + "\n…"
        key: object = None
        if record is not None:
            key = record
            for part in dataset.key_field.split("."):
                key = key.get(part) if isinstance(key, dict) else None
        rows.append(
            SampleRow(
                partition=event.partition,
                offset=event.offset,
                timestamp_ms=event.timestamp_ms,
                key_text="—" if key is None else str(key),
                value_text=shown,
                mismatches=reasons,
            )
        )
    return rows


def sample_rows(
    dataset: Dataset, events: list[SampledEvent], registry: Registry | None = None
) -> list[SampleRow]:
    """Recent events with the schema fields each one disagrees with (the API's schema check)."""
    if dataset.format in REGISTRY_FORMATS:
        return _registry_rows(dataset, events, registry or default_registry())
    schema = event_schema(dataset)
    rows = []
    for event in events:
        decoded = decode_event(event.value)
        shown = (
            orjson.dumps(decoded, option=orjson.OPT_INDENT_2).decode()
            if isinstance(decoded, dict)
            else (event.value or b"").decode("utf-8", "replace")
        )
        if len(shown) > MAX_SHOWN_BYTES:
            shown = shown[:MAX_SHOWN_BYTES] + "\n…"
        key = decoded.get(dataset.key_field) if isinstance(decoded, dict) else None
        mismatches = [m.field for m in validate_events(schema, [event.value])]
        rows.append(
            SampleRow(
                partition=event.partition,
                offset=event.offset,
                timestamp_ms=event.timestamp_ms,
                key_text="—" if key is None else str(key),
                value_text=shown,
                mismatches=mismatches,
            )
        )
    return rows


def sample_topic(
    session: Session,
    bootstrap: str,
    name: str,
    size: int = SAMPLE_SIZE,
    timeout: float = SAMPLE_TIMEOUT_S,
) -> TopicSample:
    """The newest `size` events of dataset `name`'s topic; a Kafka problem is reported, not raised.

    NotFound if the dataset does not exist.
    """
    dataset = get_dataset(session, name)
    try:
        events = read_recent_events(bootstrap, dataset.topic, size, timeout)
    except TopicNotFound:
        return TopicSample(dataset, problem=f"Topic {dataset.topic} no longer exists in Kafka.")
    except KafkaException as exc:
        return TopicSample(dataset, problem=f"Kafka at {bootstrap} did not answer: {exc.args[0]}")
    try:
        return TopicSample(dataset, sample_rows(dataset, events))
    except RegistryUnavailable as exc:
        return TopicSample(dataset, problem=str(exc))


@dataclass
class SubjectView:
    """A registry dataset's subject as the dataset page shows it: versions and field mapping."""

    subject: str
    versions: list[int] = field(default_factory=list)
    latest_id: int | None = None
    problem: str = ""


def subject_view(
    fmt: str, subject: str | None, registry: Registry | None = None
) -> SubjectView | None:
    """The subject of a registry-format dataset (None for JSON); problems reported, not raised."""
    if fmt not in REGISTRY_FORMATS or not subject:
        return None
    registry = registry or default_registry()
    view = SubjectView(subject)
    try:
        view.versions = registry.versions(subject)
        view.latest_id = registry.latest(subject).schema_id
    except SchemaNotFound:
        view.problem = f"Subject {subject} has no schema in the Schema Registry."
    except RegistryUnavailable as exc:
        view.problem = str(exc)
    return view
