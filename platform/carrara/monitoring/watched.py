"""`Watched`: a running deployment as the monitor needs it (topics, champion, monitoring config and
the champion version's training profile), and how it is read from Postgres."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.deployments.schemas import MonitoringConfig
from carrara.deployments.service import champion_of
from carrara.models import Deployment, DeploymentRevision, ModelVersion, RegisteredModel
from carrara.monitoring.rules import monitoring_config


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
        watched[deployment.name] = item
    return watched
