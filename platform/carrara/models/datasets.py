"""Datasets (a Kafka topic + event schema) and their immutable, offset-pinned snapshots."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from carrara.models.base import Base, TimestampMixin


class Dataset(TimestampMixin, Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    topic: Mapped[str] = mapped_column(String(249))
    key_field: Mapped[str] = mapped_column(String(200))
    event_time_field: Mapped[str | None] = mapped_column(String(200))
    label_field: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(20))
    # [{"name", "type"} + for registry formats optionally "path", "nulls", "default"]
    features: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    # json | avro | protobuf | json_schema; registry formats name their subject.
    format: Mapped[str] = mapped_column(String(20), default="json", server_default="json")
    subject: Mapped[str | None] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(100), default="")

    versions: Mapped[list[DatasetVersion]] = relationship(
        back_populates="dataset", order_by="DatasetVersion.number"
    )


class DatasetVersion(TimestampMixin, Base):
    """A snapshot: per-partition `[start, end)` offsets that make a training run replayable."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    # [{"partition": 0, "start": 0, "end": 1200}, ...]
    offsets: Mapped[list[dict[str, int]]] = mapped_column(JSONB)
    event_count: Mapped[int] = mapped_column(BigInteger)
    # How the offsets were chosen: "latest", "time_range" or "explicit" (with the inputs given).
    mode: Mapped[str] = mapped_column(String(20), default="latest")
    selector: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_by: Mapped[str] = mapped_column(String(100), default="")
    description: Mapped[str] = mapped_column(Text, default="")

    dataset: Mapped[Dataset] = relationship(back_populates="versions")
