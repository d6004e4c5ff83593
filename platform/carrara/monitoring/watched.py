"""`Watched`: a running deployment as the monitor needs it (topics, champion, monitoring config and
the champion version's training profile), and how it is read from Postgres."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.deployments.schemas import MonitoringConfig
from carrara.deployments.service import champion_of
from carrara.models import (
    Dataset,
    DatasetVersion,
    Deployment,
    DeploymentRevision,
    ModelVersion,
    RegisteredModel,
    TrainingRun,
)
from carrara.monitoring.rules import monitoring_config
from carrara.streams.event_codec import FeatureError, as_event_schema
from carrara.streams.event_schema import REGISTRY_FORMATS, EventFormat

log = structlog.get_logger(__name__)


@dataclass
class Watched:
    """A running deployment, as the monitor needs it."""

    name: str
    created_ms: int
    input_topic: str
    output_topic: str
    key_field: str
    champion: str
    variants: dict[str, dict[str, Any]]
    monitoring: dict[str, Any] | None
    task: str | None = None
    label_classes: list[Any] | None = None
    # Drift: the champion version's training profile per feature, and that version's row id.
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_version_id: int | None = None
    # The monitoring config with `MonitoringConfig`'s defaults for what the spec leaves out.
    config: MonitoringConfig = field(default_factory=MonitoringConfig)
    # The dataset schema of the champion's training run when its events are registry-framed
    # (Avro, Protobuf, JSON Schema): inputs are then decoded as the scorer decodes them. None:
    # JSON objects, whose features are read by name.
    input_schema: dict[str, Any] | None = None

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.input_topic}.dead-letters"

    @property
    def outcomes_topic(self) -> str | None:
        return self.config.outcomes_topic

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=self.config.window_s)


def watched_from_spec(name: str, created_ms: int, spec: dict[str, Any]) -> Watched:
    """The monitor's view of a stored spec (without the training profile, see `load_watched`)."""
    monitoring = spec.get("monitoring") or None
    return Watched(
        name=name,
        created_ms=created_ms,
        input_topic=spec["input_topic"],
        output_topic=spec["output_topic"],
        key_field=spec["key_field"],
        champion=champion_of(spec),
        variants={v["name"]: v for v in spec["variants"]},
        monitoring=monitoring,
        config=monitoring_config(monitoring),
    )


def load_watched(session: Session) -> dict[str, Watched]:
    """Every running deployment with its current spec, champion and training profile."""
    watched: dict[str, Watched] = {}
    rows = session.execute(
        select(Deployment, DeploymentRevision)
        .join(
            DeploymentRevision,
            (DeploymentRevision.deployment_id == Deployment.id)
            & (DeploymentRevision.number == Deployment.current_revision),
        )
        .where(Deployment.stopped_at.is_(None))
    ).all()
    for deployment, revision in rows:
        spec = revision.spec
        if not spec:
            continue
        item = watched_from_spec(
            deployment.name, int(deployment.created_at.timestamp() * 1000), spec
        )
        champion_variant = item.variants.get(item.champion)
        if champion_variant is not None:
            version = session.scalar(
                select(ModelVersion)
                .join(RegisteredModel)
                .where(
                    RegisteredModel.name == champion_variant["model"],
                    ModelVersion.version == champion_variant["version"],
                )
            )
            profile = version.feature_profile if version is not None else None
            if version is not None and profile:
                item.task = profile.get("task")
                item.label_classes = profile.get("label_classes")
                item.profiles = profile.get("features") or {}
                item.profile_version_id = version.id
                item.input_schema = _registry_schema(session, version.run_id)
        watched[deployment.name] = item
    return watched


def _registry_schema(session: Session, run_id: int | None) -> dict[str, Any] | None:
    """The schema of the dataset a run trained on, if its events are registry-framed."""
    if run_id is None:
        return None
    dataset = session.scalar(
        select(Dataset)
        .join(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
        .join(TrainingRun, TrainingRun.dataset_version_id == DatasetVersion.id)
        .where(TrainingRun.id == run_id)
    )
    if dataset is None or EventFormat(dataset.format) not in REGISTRY_FORMATS:
        return None
    schema = {
        "key_field": dataset.key_field,
        "event_time_field": dataset.event_time_field,
        "label_field": dataset.label_field,
        "task": dataset.task,
        "features": dataset.features,
        "format": dataset.format,
        "subject": dataset.subject,
    }
    try:
        as_event_schema(schema)
    except FeatureError as exc:  # not decodable: its inputs are not profiled
        log.warning(
            "inputs not profiled: the dataset schema is unreadable", run=run_id, error=str(exc)
        )
        return None
    return schema
