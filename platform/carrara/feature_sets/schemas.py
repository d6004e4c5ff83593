"""Pydantic shapes of `/api/v1/datasets/{name}/features`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from carrara.features.plan import LatePolicy

MAX_SQL = 20_000
MAX_PREVIEW_EVENTS = 1000


class FeatureSetPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: str = Field(min_length=1, max_length=MAX_SQL, description="The feature SQL (README)")
    late_policy: LatePolicy = Field(
        LatePolicy.cap,
        description="Events older than their key's latest time: `cap` keeps them at that time, "
        "`drop` scores them but keeps them out of the state",
    )
    allowed_lateness_ms: int = Field(
        0, ge=0, le=86_400_000, description="How late an event may be before it counts as late"
    )
    reason: str = Field("", max_length=1000)


class FeatureOutput(BaseModel):
    name: str
    kind: str
    sql: str


class FeatureSetRevisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    sql: str
    late_policy: str
    allowed_lateness_ms: int
    digest: str
    outputs: list[FeatureOutput]
    horizon_ms: int
    reason: str
    created_by: str
    created_at: datetime


class FeatureSetOut(BaseModel):
    dataset: str
    current: FeatureSetRevisionOut | None
    revisions: list[FeatureSetRevisionOut] = Field(description="Newest first")


class FeaturePreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: str | None = Field(
        None, max_length=MAX_SQL, description="SQL to try (default: the current revision's)"
    )
    late_policy: LatePolicy | None = None
    allowed_lateness_ms: int | None = Field(None, ge=0, le=86_400_000)
    events: int = Field(20, ge=1, le=MAX_PREVIEW_EVENTS, description="The newest N events")
    engine: Literal["operator", "duckdb"] = Field(
        "operator",
        description="`operator`: the reference incremental operator (what scorers and training "
        "run); `duckdb`: the fast path, held equal to it by a property-based test",
    )


class FeaturePreviewRow(BaseModel):
    partition: int
    offset: int
    key: str | None
    time_ms: int | None
    late: bool
    features: dict[str, Any] | None
    problem: str | None = None


class FeaturePreviewOut(BaseModel):
    dataset: str
    revision: int | None = Field(description="The revision computed; null for SQL given inline")
    columns: list[FeatureOutput]
    rows: list[FeaturePreviewRow] = Field(description="In log order per partition")
    note: str
