"""Datasets (a topic + its event schema) and their immutable, offset-pinned versions.

Why one module of ~460 lines: a dataset and its versions are one service (routers, UI and CLI
call it); creating a version re-checks the dataset's topic and schema with the same helpers and
audits in the same shape, so splitting them would split those rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from sqlalchemy import delete as sql_delete
from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carrara.audit.service import record
from carrara.auth.principal import Principal
from carrara.datasets.schemas import DatasetCreate, SnapshotCreate
from carrara.errors import Conflict, Invalid, NotFound, Unavailable
from carrara.models import Dataset, DatasetVersion, TrainingRun
from carrara.pagination import PageParams, paginate
from carrara.streams.event_codec import feature_as_dict
from carrara.streams.event_schema import (
    REGISTRY_FORMATS,
    EventFormat,
    EventSchema,
    Feature,
    FeatureType,
    NullPolicy,
    Task,
    validate_events,
)
from carrara.streams.registry_formats import check_registered_schema
from carrara.streams.schema_registry import (
    Registry,
    RegistryUnavailable,
    SchemaNotFound,
    SubjectVersion,
    default_registry,
)
from carrara.streams.snapshot import (
    PartitionRange,
    SnapshotError,
    TopicNotFound,
    read_recent_events,
    snapshot_offsets,
    topic_partitions,
)
from carrara.streams.topics import TopicAdmin
from carrara.topic_policy import TopicPolicy

# How long a request waits on Kafka before answering 503.
KAFKA_TIMEOUT = 5.0
# How many of the newest events a new dataset's schema is checked against.
SAMPLE_SIZE = 200


@dataclass(frozen=True)
class CreatedDataset:
    dataset: Dataset
    topic_created: bool
    sample_size: int
    subject_version: int | None = None


def _feature(data: dict[str, Any]) -> Feature:
    return Feature(
        data["name"],
        FeatureType(data["type"]),
        path=data.get("path") or None,
        nulls=NullPolicy(data.get("nulls") or NullPolicy.missing),
        default=data.get("default"),
    )


def event_schema(dataset: Dataset) -> EventSchema:
    """The event schema a dataset declares."""
    fmt = EventFormat(dataset.format or EventFormat.json)
    return EventSchema(
        key_field=dataset.key_field,
        features=tuple(_feature(f) for f in dataset.features),
        task=Task(dataset.task),
        label_field=dataset.label_field,
        event_time_field=dataset.event_time_field,
        format=fmt,
        subject=dataset.subject if fmt in REGISTRY_FORMATS else None,
    )


def check_subject(
    schema: EventSchema, registry: Registry | None = None
) -> tuple[SubjectVersion, list[Feature]]:
    """Check `schema`'s fields against its subject's latest schema: 422 naming each missing or
    mistyped field; 503 when the registry does not answer. Returns the version checked and the
    features with the defaults the schema declares filled in (where none was given)."""
    assert schema.subject is not None
    registry = registry or default_registry()
    try:
        latest = registry.latest(schema.subject)
    except SchemaNotFound as exc:
        raise Invalid(
            f"subject '{schema.subject}' has no schema in the Schema Registry: register the "
            "schema first (producers usually do on their first record)",
            errors=[{"field": "subject", "message": f"no subject '{schema.subject}'"}],
        ) from exc
    except RegistryUnavailable as exc:
        raise Unavailable(str(exc)) from exc
    mismatches, defaults = check_registered_schema(schema, latest.schema)
    if mismatches:
        fields = ", ".join(f"'{m.field}'" for m in mismatches)
        raise Invalid(
            f"the fields do not match version {latest.version} (the latest) of subject "
            f"'{schema.subject}': check {fields}",
            errors=[m.as_dict() for m in mismatches],
            subject=schema.subject,
            subject_version=latest.version,
        )
    features = [
        f
        if f.default is not None or f.field not in defaults
        else Feature(f.name, f.type, f.path, f.nulls, defaults[f.field])
        for f in schema.features
    ]
    return latest, features


def as_audit(dataset: Dataset) -> dict[str, Any]:
    """The fields of a dataset worth keeping in the audit log."""
    return {
        "name": dataset.name,
        "topic": dataset.topic,
        "key_field": dataset.key_field,
        "event_time_field": dataset.event_time_field,
        "label_field": dataset.label_field,
        "task": dataset.task,
        "features": dataset.features,
        "format": dataset.format,
        "subject": dataset.subject,
        "description": dataset.description,
        "owner": dataset.owner,
    }


def _unavailable(bootstrap: str, exc: KafkaException) -> Unavailable:
    return Unavailable(f"Kafka at {bootstrap} did not answer: {exc.args[0]}")


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = TopicAdmin(bootstrap)
    existing = admin.partitions(topic, timeout=KAFKA_TIMEOUT)
    if existing:
        raise Conflict(
            f"topic '{topic}' already exists (with {len(existing)} partitions): "
            "leave out `create_topic` to use it"
        )
    try:
        admin.create_topic(topic, partitions, timeout=KAFKA_TIMEOUT)
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            raise Conflict(f"topic '{topic}' already exists: {error.str()}") from exc
        if error.retriable() or error.code() in (
            KafkaError._TRANSPORT,
            KafkaError._TIMED_OUT,
            KafkaError._ALL_BROKERS_DOWN,
        ):
            raise
        raise Invalid(f"Kafka refused to create topic '{topic}': {error.str()}") from exc


def create_dataset(
    session: Session,
    bootstrap: str,
    data: DatasetCreate,
    principal: Principal,
    topics: TopicPolicy | None = None,
) -> CreatedDataset:
    """Register a dataset after checking its topic and its schema against recent events.

    The topic may not be one of Carrara's or Kafka's own, and must match `topics`' prefixes;
    creating it is bounded by `topics`' partition limit.
    """
    policy = topics or TopicPolicy()
    policy.check({"topic": data.topic})
    if data.create_topic is not None:
        policy.check_creation([(data.topic, data.create_topic.partitions)])
    if session.scalar(select(exists().where(Dataset.name == data.name))):
        raise Conflict(f"dataset '{data.name}' already exists")
    registry_format = data.format in REGISTRY_FORMATS
    features = [
        feature_as_dict(Feature(f.name, f.type, f.path, f.nulls, f.default)) for f in data.features
    ]
    dataset = Dataset(
        name=data.name,
        topic=data.topic,
        key_field=data.key_field,
        event_time_field=data.event_time_field,
        label_field=data.label_field,
        task=data.task.value,
        features=features,
        format=data.format.value,
        subject=data.subject if registry_format else None,
        description=data.description,
        owner=data.owner,
        created_by=principal.name,
    )
    checked: SubjectVersion | None = None
    if registry_format:
        # The subject's latest schema says what every field is: no need to sample events.
        checked, with_defaults = check_subject(event_schema(dataset))
        dataset.features = [feature_as_dict(f) for f in with_defaults]
    try:
        if data.create_topic is not None:
            _create_topic(bootstrap, data.topic, data.create_topic.partitions)
            sample = []  # a topic created just now holds nothing to check
        elif registry_format:
            topic_partitions(bootstrap, data.topic, KAFKA_TIMEOUT)
            sample = []
        else:
            sample = read_recent_events(bootstrap, data.topic, SAMPLE_SIZE, KAFKA_TIMEOUT)
    except TopicNotFound as exc:
        raise Invalid(
            f"topic '{data.topic}' does not exist in Kafka: create it first, or pass "
            "`create_topic: {partitions: N}` to have it created",
            errors=[{"field": "topic", "message": "no such Kafka topic"}],
        ) from exc
    except KafkaException as exc:
        raise _unavailable(bootstrap, exc) from exc

    mismatches = validate_events(event_schema(dataset), [e.value for e in sample])
    if mismatches:
        fields = ", ".join(f"'{m.field}'" for m in mismatches)
        raise Invalid(
            f"the schema does not match {len(sample)} recent events of topic '{data.topic}': "
            f"check {fields}",
            errors=[m.as_dict() for m in mismatches],
            sample_size=len(sample),
        )

    try:
        with session.begin_nested():
            session.add(dataset)
    except IntegrityError as exc:  # another request took the name since the check above
        raise Conflict(f"dataset '{data.name}' already exists") from exc
    record(
        session,
        principal,
        "dataset.create",
        "dataset",
        dataset.name,
        after=as_audit(dataset),
        detail=(
            f"topic created with {data.create_topic.partitions} partitions"
            if data.create_topic
            else f"fields checked against version {checked.version} of subject {checked.subject}"
            if checked is not None
            else f"schema checked against {len(sample)} recent events"
        ),
    )
    return CreatedDataset(
        dataset,
        data.create_topic is not None,
        len(sample),
        checked.version if checked is not None else None,
    )


def list_datasets(
    session: Session,
    params: PageParams,
    *,
    name_prefix: str | None = None,
    topic: str | None = None,
) -> tuple[list[Dataset], str | None]:
    """Datasets, newest first, optionally those whose name starts with a prefix or on a topic."""
    stmt = select(Dataset)
    if name_prefix:
        stmt = stmt.where(Dataset.name.startswith(name_prefix, autoescape=True))
    if topic:
        stmt = stmt.where(Dataset.topic == topic)
    return paginate(session, stmt, Dataset.id, params)


def get_dataset(session: Session, name: str) -> Dataset:
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        raise NotFound(f"dataset '{name}' does not exist")
    return dataset


def update_dataset(
    session: Session,
    name: str,
    principal: Principal,
    *,
    description: str | None,
    owner: str | None,
) -> Dataset:
    """Change the description and/or owner (its schema and topic are fixed)."""
    dataset = get_dataset(session, name)
    before = {"description": dataset.description, "owner": dataset.owner}
    if description is not None:
        dataset.description = description
    if owner is not None:
        dataset.owner = owner
    session.flush()
    record(
        session,
        principal,
        "dataset.update",
        "dataset",
        dataset.name,
        before=before,
        after={"description": dataset.description, "owner": dataset.owner},
    )
    return dataset


def delete_dataset(session: Session, name: str, principal: Principal) -> dict[str, Any]:
    """Delete a dataset and its versions (not its topic); 409 while a training run uses one."""
    dataset = get_dataset(session, name)
    in_use = (
        select(TrainingRun.id).join(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
    )
    runs = session.scalar(select(func.count()).select_from(in_use.subquery()))
    if runs:
        raise Conflict(
            f"dataset '{name}' cannot be deleted: {runs} training run(s) use its versions"
        )
    before = as_audit(dataset)
    try:
        with session.begin_nested():
            # A bulk delete lets the database cascade to the versions; the ORM would try to
            # null their foreign key instead.
            session.execute(sql_delete(Dataset).where(Dataset.id == dataset.id))
    except IntegrityError as exc:  # a run started on one of its versions meanwhile
        raise Conflict(f"dataset '{name}' cannot be deleted: a training run uses it") from exc
    session.expunge(dataset)
    record(session, principal, "dataset.delete", "dataset", name, before=before)
    return before


def create_version(
    session: Session, bootstrap: str, name: str, data: SnapshotCreate, principal: Principal
) -> DatasetVersion:
    """Pin the dataset's topic offsets as the next immutable version (v1, v2, ...)."""
    dataset = get_dataset(session, name)
    explicit = [PartitionRange(o.partition, o.start, o.end) for o in data.offsets or []]
    try:
        snapshot = snapshot_offsets(
            bootstrap,
            dataset.topic,
            data.mode,
            time_from=data.from_,
            time_to=data.to,
            offsets=explicit,
            timeout=KAFKA_TIMEOUT,
        )
    except TopicNotFound as exc:
        raise Conflict(
            f"topic '{dataset.topic}' of dataset '{name}' no longer exists in Kafka"
        ) from exc
    except SnapshotError as exc:
        raise Invalid(str(exc), errors=exc.errors) from exc
    except KafkaException as exc:
        raise _unavailable(bootstrap, exc) from exc

    # Lock the dataset row so concurrent snapshots take numbers one after the other; the unique
    # constraint on (dataset_id, number) stays the last line of defence.
    session.execute(select(Dataset.id).where(Dataset.id == dataset.id).with_for_update())
    number = (
        session.scalar(
            select(func.max(DatasetVersion.number)).where(DatasetVersion.dataset_id == dataset.id)
        )
        or 0
    ) + 1
    version = DatasetVersion(
        dataset_id=dataset.id,
        number=number,
        offsets=[r.as_dict() for r in snapshot.ranges],
        event_count=snapshot.event_count,
        mode=data.mode.value,
        selector=data.selector(),
        created_by=principal.name,
        description=data.description,
    )
    try:
        with session.begin_nested():
            session.add(version)
    except IntegrityError as exc:
        raise Conflict(
            f"version {number} of dataset '{name}' was taken by a concurrent snapshot; retry"
        ) from exc
    record(
        session,
        principal,
        "dataset.version.create",
        "dataset_version",
        f"{name}/v{version.number}",
        after={
            "dataset": name,
            "number": version.number,
            "mode": version.mode,
            "selector": version.selector,
            "offsets": version.offsets,
            "event_count": version.event_count,
        },
    )
    return version


def list_versions(
    session: Session, name: str, params: PageParams
) -> tuple[list[DatasetVersion], str | None]:
    """Versions of a dataset, newest first."""
    dataset = get_dataset(session, name)
    stmt = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
    return paginate(session, stmt, DatasetVersion.id, params)


def get_version(session: Session, name: str, number: int) -> DatasetVersion:
    """Version `number` of dataset `name`."""
    dataset = get_dataset(session, name)
    version = session.scalar(
        select(DatasetVersion).where(
            DatasetVersion.dataset_id == dataset.id, DatasetVersion.number == number
        )
    )
    if version is None:
        raise NotFound(f"dataset '{name}' has no version {number}")
    return version


def recent_versions(
    session: Session, datasets: int, per_dataset: int
) -> list[tuple[Dataset, list[DatasetVersion]]]:
    """The newest `datasets` datasets, each with its newest `per_dataset` versions (two queries)."""
    rows = list(session.scalars(select(Dataset).order_by(Dataset.id.desc()).limit(datasets)))
    if not rows:
        return []
    rank = (
        func.row_number()
        .over(partition_by=DatasetVersion.dataset_id, order_by=DatasetVersion.id.desc())
        .label("rank")
    )
    ranked = (
        select(DatasetVersion.id, rank)
        .where(DatasetVersion.dataset_id.in_([d.id for d in rows]))
        .subquery()
    )
    versions = session.scalars(
        select(DatasetVersion)
        .join(ranked, ranked.c.id == DatasetVersion.id)
        .where(ranked.c.rank <= per_dataset)
        .order_by(DatasetVersion.id.desc())
    )
    by_dataset: dict[int, list[DatasetVersion]] = {d.id: [] for d in rows}
    for version in versions:
        by_dataset[version.dataset_id].append(version)
    return [(d, by_dataset[d.id]) for d in rows]
