from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from carrara.models import TrainingRun
from carrara.training.algorithms import SEED_MAX

DATASET_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
# MLflow refuses '/' and ':' in registered model names; a slug-like name also keeps URLs clean.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
INT32_MAX = 2**31 - 1


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class Holdout(BaseModel):
    """How the evaluation events are held out of training."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["hash", "time"] = Field(
        default="hash",
        description="`hash`: a stable hash of the key field picks the holdout entities; "
        "`time`: the latest events by event time (needs the dataset's event-time field).",
    )
    fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of events held out.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Salt of the `hash` method.")


# Every user-supplied mapping is bounded (the body limit bounds the rest): no algorithm takes more.
MAX_PARAMS = 64


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(pattern=DATASET_NAME_PATTERN, description="Dataset name.")
    dataset_version: int = Field(ge=1, le=INT32_MAX, description="Snapshot number (v1 = 1).")
    algorithm: str = Field(
        min_length=1, max_length=50, description="See `GET /api/v1/runs/algorithms`."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        max_length=MAX_PARAMS,
        description="Algorithm params; unset ones take their defaults.",
    )
    holdout: Holdout = Field(default_factory=Holdout)
    registered_model_name: str = Field(
        pattern=MODEL_NAME_PATTERN,
        description="The MLflow registered model the trained model becomes a version of.",
    )


class AlgorithmOut(BaseModel):
    name: str
    title: str
    description: str
    tasks: list[str] = Field(description="Dataset tasks the algorithm can train on.")
    params_schema: dict[str, Any] = Field(description="JSON schema of the algorithm's params.")


class RunOut(BaseModel):
    id: int
    dataset: str
    dataset_version: int
    dataset_version_id: int
    algorithm: str
    params: dict[str, Any]
    holdout: dict[str, Any]
    registered_model_name: str
    status: RunStatus
    progress: float = Field(description="Events replayed / events total, from 0 to 1.")
    events_replayed: int
    events_total: int
    metrics: dict[str, Any]
    error: str | None
    mlflow_run_id: str | None
    mlflow_url: str | None
    model_version_id: int | None
    idempotency_key: str | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    worker: str | None = Field(description="The worker holding the run (while it runs).")
    attempts: int = Field(description="How many times a worker started the run.")
    results: dict[str, Any] = Field(
        description="Bad-event count and sample, rows used, ONNX export, AutoML leaderboard."
    )

    @classmethod
    def from_run(cls, run: TrainingRun) -> RunOut:
        """The API view of a run, with its dataset's name and version number."""
        if run.events_total > 0:
            progress = min(1.0, run.events_replayed / run.events_total)
        else:
            progress = 1.0 if run.status == RunStatus.succeeded else 0.0
        version = run.dataset_version
        return cls(
            id=run.id,
            dataset=version.dataset.name,
            dataset_version=version.number,
            dataset_version_id=run.dataset_version_id,
            algorithm=run.algorithm,
            params=run.params,
            holdout=run.holdout,
            registered_model_name=run.registered_model_name,
            status=RunStatus(run.status),
            progress=progress,
            events_replayed=run.events_replayed,
            events_total=run.events_total,
            metrics=run.metrics,
            error=run.error,
            mlflow_run_id=run.mlflow_run_id,
            mlflow_url=run.mlflow_url,
            model_version_id=run.model_version_id,
            idempotency_key=run.idempotency_key,
            created_by=run.created_by,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            heartbeat_at=run.heartbeat_at,
            worker=run.worker,
            attempts=run.attempts or 0,
            results=run.results or {},
        )
