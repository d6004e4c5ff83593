"""Registered models, their versions (lineage to a run) and aliases, mirrored from MLflow."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from carrara.models.base import Base, TimestampMixin


class RegisteredModel(TimestampMixin, Base):
    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="registered_model", order_by="ModelVersion.version"
    )
    aliases: Mapped[list[ModelAlias]] = relationship(
        back_populates="registered_model", order_by="ModelAlias.alias"
    )


class ModelVersion(TimestampMixin, Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("registered_model_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    registered_model_id: Mapped[int] = mapped_column(
        ForeignKey("registered_models.id", ondelete="CASCADE")
    )
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    mlflow_source: Mapped[str] = mapped_column(String(500), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # The training data's distribution per feature (bins and shares), for drift monitoring.
    feature_profile: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # SHA-256 of every file a scorer loads, pinned at registration (carrara.artifacts); None for
    # versions registered before digests existed. Deployments carry them to the scorers.
    artifact_digests: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    # Set by an admin (audited): the version may be loaded from formats that run code (pickle,
    # cloudpickle, pyfunc). Scorers learn it from the deployment spec, never from MLflow.
    trusted_code: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # How it came: "training" (a Carrara run), "mlflow" (imported), "upload" (an ONNX upload).
    origin: Mapped[str | None] = mapped_column(String(20))

    registered_model: Mapped[RegisteredModel] = relationship(back_populates="versions")


class ModelAlias(Base):
    __tablename__ = "model_aliases"

    registered_model_id: Mapped[int] = mapped_column(
        ForeignKey("registered_models.id", ondelete="CASCADE"), primary_key=True
    )
    alias: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))

    registered_model: Mapped[RegisteredModel] = relationship(back_populates="aliases")
    model_version: Mapped[ModelVersion] = relationship()
