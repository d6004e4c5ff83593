from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carrara.streams.event_schema import (
    REGISTRY_FORMATS,
    EventFormat,
    FeatureType,
    NullPolicy,
    Task,
)
from carrara.streams.snapshot import SnapshotMode

if TYPE_CHECKING:
    from carrara.models import DatasetVersion

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
# Kafka's own rule for topic names (and "." / ".." are refused below).
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
# Any JSON key a producer may use, minus control characters (Postgres refuses NUL in text).
FIELD_PATTERN = r"^[^\x00-\x1f\x7f]+$"
TEXT_PATTERN = r"^[^\x00]*$"
MAX_OFFSET = 2**63 - 1
MAX_PARTITION = 2**31 - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

DatasetName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        pattern=NAME_PATTERN,
        description="Unique slug: lowercase letters, digits, '.', '_', '-'",
        examples=["card-fraud"],
    ),
]
TopicName = Annotated[
    str, Field(min_length=1, max_length=249, pattern=TOPIC_PATTERN, examples=["payments"])
]
FieldName = Annotated[str, Field(min_length=1, max_length=200, pattern=FIELD_PATTERN)]
# A field in a registry-format record: names joined by dots for nested fields (payment.amount).
FIELD_PATH_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
FieldPath = Annotated[
    str,
    Field(min_length=1, max_length=400, pattern=FIELD_PATH_PATTERN, examples=["payment.amount"]),
]
# Schema Registry subject names (any text but control characters).
SubjectName = Annotated[
    str, Field(min_length=1, max_length=255, pattern=FIELD_PATTERN, examples=["payments-value"])
]
Description = Annotated[str, Field(max_length=10_000, pattern=TEXT_PATTERN)]
Owner = Annotated[str, Field(max_length=200, pattern=TEXT_PATTERN)]


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FieldName
    type: FeatureType
    # Left out of responses when unset, so JSON datasets read as they did before.
    path: FieldPath | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Registry formats: the field in the record (dots for nested fields); "
        "default: the field named like the feature.",
    )
    nulls: NullPolicy = Field(
        default=NullPolicy.missing,
        exclude_if=lambda v: v == NullPolicy.missing,
        description="`missing`: a null (or a field the record's schema lacks) is a missing value; "
        "`reject`: the event is bad.",
    )
    default: float | int | str | bool | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Registry formats: the value of records whose schema lacks the field "
        "(filled from the subject's schema default when not given).",
    )


class CreateTopic(BaseModel):
    """Create the topic with this many partitions instead of requiring it to exist."""

    model_config = ConfigDict(extra="forbid")

    partitions: int = Field(ge=1, le=1000)


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DatasetName
    topic: TopicName
    key_field: FieldName
    event_time_field: FieldName | None = None
    features: list[FeatureSpec] = Field(min_length=1, max_length=1000)
    label_field: FieldName | None = Field(
        default=None, description="Required unless the task is `anomaly` (unlabeled)."
    )
    task: Task
    format: EventFormat = Field(
        default=EventFormat.json,
        description="How records are encoded: `json` (a JSON object), or `avro`, `protobuf`, "
        "`json_schema` in the Schema Registry wire format.",
    )
    subject: SubjectName | None = Field(
        default=None,
        description="Registry formats: the Schema Registry subject (default `<topic>-value`).",
    )
    description: Description = ""
    owner: Owner = ""
    create_topic: CreateTopic | None = Field(
        default=None, description="Create the topic (it must not exist yet) with N partitions."
    )

    @field_validator("topic")
    @classmethod
    def _not_dots(cls, topic: str) -> str:
        if topic in (".", ".."):
            raise ValueError("'.' and '..' are not valid Kafka topic names")
        return topic

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [f.name for f in self.features]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"feature names must be unique; repeated: {', '.join(duplicates)}")
        if self.label_field is None and self.task is not Task.anomaly:
            raise ValueError(f"label_field is required for a {self.task.value} task")
        # Trainers read the key, label and event time apart from the features: one role each.
        roles = {
            "key": self.key_field,
            "label": self.label_field,
            "event time": self.event_time_field,
        }
        for role, field in roles.items():
            if field is not None and field in names:
                raise ValueError(f"{role} field '{field}' must not also be a feature")
        given = [f for f in roles.values() if f is not None]
        if len(set(given)) < len(given):
            raise ValueError("the key, label and event-time fields must be different fields")
        if self.format not in REGISTRY_FORMATS:
            if self.subject is not None:
                raise ValueError("`subject` applies to the registry formats, not json")
            if any(f.path is not None or f.default is not None for f in self.features):
                raise ValueError("feature `path` and `default` apply to the registry formats")
        elif self.subject is None:
            self.subject = f"{self.topic}-value"
        if self.format is EventFormat.json_schema:
            nested = [
                p
                for p in (
                    self.key_field,
                    self.label_field,
                    self.event_time_field,
                    *(f.path for f in self.features),
                )
                if p and "." in p
            ]
            if nested:
                raise ValueError(
                    f"json_schema datasets read top-level fields; nested: {', '.join(nested)}"
                )
        if all(f.type is FeatureType.string for f in self.features):
            raise ValueError(
                "at least one feature must be float, int, bool or category "
                "(string features are checked but not used for training)"
            )
        return self


class DatasetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: Description | None = None
    owner: Owner | None = None


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    topic: str
    key_field: str
    event_time_field: str | None
    label_field: str | None
    task: Task
    features: list[FeatureSpec]
    format: EventFormat = EventFormat.json
    subject: str | None = None
    description: str
    owner: str
    created_by: str
    created_at: datetime


class DatasetCreated(DatasetOut):
    topic_created: bool = Field(description="True when this call created the Kafka topic.")
    sample_size: int = Field(
        description="How many recent events the schema was checked against (0: empty topic, "
        "nothing to check; registry formats are checked against the subject's schema instead)."
    )
    subject_version: int | None = Field(
        default=None,
        description="Registry formats: the version of the subject the features were checked "
        "against (its latest).",
    )


class PartitionOffsets(BaseModel):
    """Records `start <= offset < end` of one partition."""

    model_config = ConfigDict(extra="forbid")

    partition: int = Field(ge=0, le=MAX_PARTITION)
    start: int = Field(ge=0, le=MAX_OFFSET)
    end: int = Field(ge=0, le=MAX_OFFSET)


class SnapshotCreate(BaseModel):
    """How to pin the offsets; naive datetimes are UTC."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    mode: SnapshotMode = SnapshotMode.latest
    from_: datetime | None = Field(
        default=None,
        alias="from",
        description="time_range: first event time included (record timestamps)",
    )
    to: datetime | None = Field(
        default=None, description="time_range: first event time excluded (exclusive bound)"
    )
    offsets: list[PartitionOffsets] | None = Field(
        default=None, max_length=10_000, description="explicit: one range per partition"
    )
    description: Description = ""

    @field_validator("from_", "to")
    @classmethod
    def _after_epoch(cls, moment: datetime | None) -> datetime | None:
        if moment is None:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        if moment < EPOCH:
            raise ValueError("must not be before 1970-01-01T00:00:00Z (Kafka timestamps)")
        return moment

    @model_validator(mode="after")
    def _fits_mode(self) -> Self:
        has_times = self.from_ is not None or self.to is not None
        if self.mode is SnapshotMode.time_range:
            if not has_times:
                raise ValueError("mode time_range needs `from`, `to` or both")
            if self.from_ is not None and self.to is not None and self.from_ >= self.to:
                raise ValueError("`from` must be before `to` (`to` is exclusive)")
        elif has_times:
            raise ValueError(f"`from`/`to` apply to mode time_range, not {self.mode.value}")
        if self.mode is SnapshotMode.explicit:
            if not self.offsets:
                raise ValueError("mode explicit needs `offsets`: one range per partition")
        elif self.offsets is not None:
            raise ValueError(f"`offsets` apply to mode explicit, not {self.mode.value}")
        return self

    def selector(self) -> dict[str, Any]:
        """The inputs that chose the offsets, as stored with the version."""
        if self.mode is SnapshotMode.time_range:
            return {
                "from": self.from_.isoformat() if self.from_ else None,
                "to": self.to.isoformat() if self.to else None,
            }
        if self.mode is SnapshotMode.explicit:
            return {"offsets": [o.model_dump() for o in self.offsets or []]}
        return {}


class DatasetVersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    dataset: str
    number: int
    mode: SnapshotMode
    selector: dict[str, Any]
    offsets: list[PartitionOffsets]
    event_count: int
    description: str
    created_by: str
    created_at: datetime

    @classmethod
    def from_version(cls, version: DatasetVersion) -> DatasetVersionOut:
        """The API's view of a stored version (named by its dataset's name, not its id)."""
        return cls(
            id=version.id,
            dataset=version.dataset.name,
            number=version.number,
            mode=SnapshotMode(version.mode),
            selector=version.selector,
            offsets=[PartitionOffsets.model_validate(o) for o in version.offsets],
            event_count=version.event_count,
            description=version.description,
            created_by=version.created_by,
            created_at=version.created_at,
        )
