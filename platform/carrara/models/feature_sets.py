"""Feature sets: a dataset's derived features in SQL, as immutable numbered revisions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from carrara.models.base import Base, TimestampMixin


class FeatureSetRevision(TimestampMixin, Base):
    """One revision of a dataset's feature set; the highest number is the current one."""

    __tablename__ = "feature_set_revisions"
    __table_args__ = (UniqueConstraint("dataset_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    sql: Mapped[str] = mapped_column(Text)
    # How events older than their key's latest time are handled (features.plan.LatePolicy).
    late_policy: Mapped[str] = mapped_column(String(10), default="cap")
    allowed_lateness_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    # sha256 of the SQL and the late policy: what a model version records.
    digest: Mapped[str] = mapped_column(String(64))
    # [{"name", "kind", "sql"}]: the derived features, as parsed when the revision was stored.
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    horizon_ms: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(100), default="")
