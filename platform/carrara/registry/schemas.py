"""Pydantic I/O models of the models API: registered models, versions with lineage, aliases."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# MLflow allows more than slugs in model names; Carrara accepts the URL-safe subset.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
# Lowercase, like every Carrara name; MLflow refuses "latest" and "v<digits>" (checked in service).
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,99}$"
MAX_VERSION = 2**31 - 1  # model_versions.version is a Postgres integer


class VersionRef(BaseModel):
    """A version number of the model named in the URL."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=MAX_VERSION, description="Model version number")


class TrustIn(BaseModel):
    """Whether scorers may load the version from formats that execute code."""

    model_config = ConfigDict(extra="forbid")

    trusted_code: bool
    reason: str = Field(default="", max_length=500, description="Why (kept in the audit log)")


OnnxOutput = Literal["probability", "class_scores", "regression", "anomaly_score"]
Label = str | int | bool


class OnnxDeclaration(BaseModel):
    """What an uploaded ONNX model takes and gives: its input columns are dataset features."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str = Field(
        min_length=1, max_length=100, description="The dataset whose events it scores"
    )
    features: list[str] = Field(
        min_length=1,
        max_length=2000,
        description="Numeric features of the dataset, in the order of the input tensor's columns",
    )
    output: OnnxOutput = Field(
        description="probability (of the positive class), class_scores (a probability per "
        "class), regression (a value) or anomaly_score (alert above threshold)"
    )
    classes: list[Label] | None = Field(
        default=None,
        max_length=1000,
        description="class_scores: the label of each column; probability: [negative, positive] "
        "(default [0, 1])",
    )
    threshold: float | None = Field(default=None, description="anomaly_score: alert above it")
    input_name: str | None = Field(
        default=None, max_length=200, description="The input tensor (default: the only one)"
    )
    output_name: str | None = Field(
        default=None, max_length=200, description="The output tensor to score with"
    )

    @model_validator(mode="after")
    def _consistent(self) -> OnnxDeclaration:
        if len(set(self.features)) != len(self.features):
            raise ValueError("features must not repeat")
        if self.output == "anomaly_score" and self.threshold is None:
            raise ValueError("an anomaly_score output needs a threshold")
        if self.output != "anomaly_score" and self.threshold is not None:
            raise ValueError("threshold is only for an anomaly_score output")
        if self.output == "class_scores" and (not self.classes or len(self.classes) < 3):
            raise ValueError("class_scores needs the label of each column in classes (3 or more)")
        if self.output == "probability" and self.classes is not None and len(self.classes) != 2:
            raise ValueError("a probability output takes classes [negative, positive]")
        if self.output in ("regression", "anomaly_score") and self.classes is not None:
            raise ValueError(f"classes are not for a {self.output} output")
        return self


class DatasetLineage(BaseModel):
    """The dataset snapshot a version was trained on: offsets pin exactly which events."""

    dataset: str
    version: int
    topic: str
    offsets: list[dict[str, int]]
    event_count: int


class RunLineage(BaseModel):
    """The Carrara training run that produced a version."""

    id: int
    status: str
    algorithm: str
    params: dict[str, Any]
    mlflow_run_id: str | None
    mlflow_url: str | None
    dataset: DatasetLineage


class VersionOut(BaseModel):
    """A model version as the platform sees it: lineage, metrics, aliases, MLflow source."""

    model: str
    version: int
    mlflow_source: str
    metrics: dict[str, Any]
    aliases: list[str]
    run: RunLineage | None = Field(
        description="The training run behind it; null for versions imported from MLflow"
    )
    origin: str | None = Field(
        default=None, description="training, mlflow (imported) or upload (an ONNX upload)"
    )
    trusted_code: bool = Field(
        default=False,
        description="An admin allowed scorers to load it from formats that execute code "
        "(pickle, cloudpickle, pyfunc)",
    )
    artifact_digests: dict[str, str] | None = Field(
        default=None,
        description="SHA-256 of every file a scorer loads, pinned at registration (null for "
        "versions registered before digests existed)",
    )
    created_at: datetime


class ModelSummary(BaseModel):
    name: str
    description: str
    latest_version: int | None
    version_count: int
    aliases: dict[str, int] = Field(description="alias -> version")
    created_at: datetime


class ModelOut(BaseModel):
    name: str
    description: str
    aliases: dict[str, int] = Field(description="alias -> version")
    versions: list[VersionOut]
    created_at: datetime


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int
    previous_version: int | None = Field(
        default=None, description="The version the alias pointed at before this call"
    )


class SyncOut(BaseModel):
    """What a reconciliation with MLflow's registry changed."""

    model: ModelOut
    imported_versions: list[int]
    aliases_set: dict[str, int]
    aliases_removed: list[str]
    aliases_skipped: list[str] = Field(
        description="MLflow aliases Carrara cannot mirror (not lowercase slugs)"
    )
