"""Declarative deployments: the one service the REST router, the UI and the monitor call.

The work is done in three modules, re-exported here:
- `specs`: how a desired state is normalized, validated and published, and the rules read from
  a stored spec (champion, verdict metric, monitoring config);
- `revisions`: apply, roll back and stop, each an immutable revision written with its outbox
  message and its audit entry in one transaction (so every change is audited, whoever makes it);
- `rollout`: which scorers serve the current revision.
This module adds the views both the API and the UI show, shaped with the API's schemas.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.deployments.revisions import (
    Applied,
    Publishing,
    apply,
    check_output_topic_creation,
    create_output_topic,
    current_revision,
    get_deployment,
    get_revision,
    last_spec_revision,
    list_deployments,
    list_revisions,
    monitoring_config,
    restart,
    rollback,
    stop,
)
from carrara.deployments.rollout import (
    LIVE_INTERVALS,
    Rollout,
    ScorerRollout,
    is_live,
    list_scorers,
    rollout,
)
from carrara.deployments.schemas import (
    DeploymentApplied,
    DeploymentDetail,
    DeploymentOut,
    DeploymentSpecOut,
    RevisionOut,
    RolloutOut,
    RolloutScorerOut,
    ScorerDeploymentOut,
    ScorerOut,
)
from carrara.deployments.specs import (
    CLASSIFICATION_TASKS,
    METRIC_TASKS,
    TOPIC_CHECK_TIMEOUT_S,
    champion_of,
    champion_task,
    check_metric,
    check_topics,
    model_task,
    monitoring_config_of,
    normalize,
    resolve_version,
    salt_for,
    spec_hash,
    status_of,
    topics_of,
    validate_live,
    variant_of,
    verdict_metric,
    wire_spec,
)
from carrara.models import Deployment, DeploymentRevision, ScorerInstance
from carrara.pagination import Page, PageParams
from carrara.settings import Settings
from carrara.topic_policy import TopicPolicy

__all__ = [
    "CLASSIFICATION_TASKS",
    "LIVE_INTERVALS",
    "METRIC_TASKS",
    "TOPIC_CHECK_TIMEOUT_S",
    "Applied",
    "Publishing",
    "Rollout",
    "ScorerRollout",
    "applied_out",
    "apply",
    "champion_of",
    "champion_task",
    "check_metric",
    "check_output_topic_creation",
    "check_topics",
    "create_output_topic",
    "current_revision",
    "deployment_detail",
    "deployment_out",
    "deployment_page",
    "deployments_using",
    "get_deployment",
    "get_revision",
    "is_live",
    "known_pools",
    "last_spec",
    "last_spec_revision",
    "list_deployments",
    "list_revisions",
    "list_scorers",
    "model_task",
    "monitoring_config",
    "monitoring_config_of",
    "normalize",
    "publishing",
    "resolve_version",
    "restart",
    "revision_out",
    "revision_page",
    "rollback",
    "rollout",
    "rollout_out",
    "salt_for",
    "scorer_out",
    "scorers",
    "spec_hash",
    "status_of",
    "stop",
    "topics_of",
    "validate_live",
    "variant_of",
    "verdict_metric",
    "wire_spec",
]


def publishing(settings: Settings) -> Publishing:
    """Where revisions go, from the settings: the Kafka cluster and the deployments topic."""
    return Publishing(
        settings.kafka_bootstrap, settings.deployments_topic, TopicPolicy.from_settings(settings)
    )


def deployment_out(deployment: Deployment, current: DeploymentRevision) -> DeploymentOut:
    return DeploymentOut(
        name=deployment.name,
        status="stopped" if deployment.stopped_at is not None else "running",
        revision=current.number,
        spec=DeploymentSpecOut.model_validate(current.spec) if current.spec else None,
        salt=salt_for(deployment),
        created_at=deployment.created_at,
        updated_at=current.created_at,
        stopped_at=deployment.stopped_at,
    )


def revision_out(row: DeploymentRevision) -> RevisionOut:
    return RevisionOut(
        number=row.number,
        stopped=row.spec is None,
        spec=DeploymentSpecOut.model_validate(row.spec) if row.spec else None,
        spec_hash=row.spec_hash,
        reason=row.reason,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def rollout_out(view: Rollout) -> RolloutOut:
    return RolloutOut(
        desired_revision=view.desired_revision,
        scorers=[
            RolloutScorerOut(
                instance_id=s.instance.instance_id,
                pool=s.instance.pool,
                host=s.instance.host,
                served_revision=s.status.get("served_revision"),
                state=s.status.get("state", ""),
                loaded_versions=s.status.get("loaded_versions", []),
                last_error=s.status.get("last_error"),
                events_scored=s.status.get("events_scored", 0),
                dead_letters=s.status.get("dead_letters", 0),
                seen_at=s.instance.seen_at,
                live=s.live,
            )
            for s in view.scorers
        ],
        up_to_date=view.up_to_date,
        total=view.total,
        stalled=view.stalled,
        summary=view.summary,
    )


def scorer_out(instance: ScorerInstance, now: datetime) -> ScorerOut:
    return ScorerOut(
        instance_id=instance.instance_id,
        pool=instance.pool,
        host=instance.host,
        started_at=instance.started_at,
        updated_at=instance.updated_at,
        seen_at=instance.seen_at,
        interval_s=instance.interval_s,
        stopping=instance.stopping,
        live=is_live(instance, now),
        deployments=[ScorerDeploymentOut.model_validate(d) for d in instance.deployments],
    )


def applied_out(session: Session, applied: Applied) -> DeploymentApplied:
    """What `PUT`, rollback and stop answer: the deployment now, and whether it changed."""
    # Refresh server-side defaults (created_at) of rows inserted in this transaction.
    session.refresh(applied.deployment)
    session.refresh(applied.revision)
    out = deployment_out(applied.deployment, applied.revision)
    return DeploymentApplied(**out.model_dump(), changed=applied.changed)


def deployment_page(
    session: Session,
    params: PageParams,
    status: str | None = None,
    name_prefix: str | None = None,
) -> Page[DeploymentOut]:
    """A page of deployments, newest first, with their current revision."""
    items, cursor = list_deployments(session, params, status, name_prefix)
    return Page(items=[deployment_out(d, r) for d, r in items], next_cursor=cursor)


def deployment_detail(session: Session, name: str) -> DeploymentDetail:
    """The current revision's spec, whether it runs, and its rollout to the scorers."""
    deployment, current = get_deployment(session, name)
    view = rollout(session, deployment, current)
    return DeploymentDetail(
        **deployment_out(deployment, current).model_dump(), rollout=rollout_out(view)
    )


def revision_page(session: Session, name: str, params: PageParams) -> Page[RevisionOut]:
    """A page of the revision history of `name`, newest first."""
    items, cursor = list_revisions(session, name, params)
    return Page(items=[revision_out(r) for r in items], next_cursor=cursor)


def scorers(session: Session, pool: str | None = None) -> list[ScorerOut]:
    """Every scorer instance known from the status topic, live or stale, by pool and id."""
    now = datetime.now(UTC)
    return [scorer_out(i, now) for i in list_scorers(session, pool)]


def last_spec(session: Session, name: str) -> tuple[int, DeploymentSpecOut] | None:
    """(revision, spec) a deployment ran last: its current one, or the one before it stopped."""
    deployment, _ = get_deployment(session, name)
    last = last_spec_revision(session, deployment)
    if last is None or last.spec is None:
        return None
    return last.number, DeploymentSpecOut.model_validate(last.spec)


def known_pools(session: Session) -> list[str]:
    """The scorer pools some scorer has reported from (live or stale), sorted."""
    return list(
        session.scalars(select(ScorerInstance.pool).distinct().order_by(ScorerInstance.pool))
    )


def deployments_using(session: Session, model: str) -> dict[int, list[str]]:
    """Running deployments whose current revision serves a version of `model`, by version."""
    rows = session.execute(
        select(Deployment.name, DeploymentRevision.spec)
        .join(
            DeploymentRevision,
            (DeploymentRevision.deployment_id == Deployment.id)
            & (DeploymentRevision.number == Deployment.current_revision),
        )
        .where(Deployment.stopped_at.is_(None), Deployment.current_revision > 0)
        .order_by(Deployment.name)
    )
    using: dict[int, list[str]] = {}
    for name, spec in rows:
        for variant in (spec or {}).get("variants", []):
            if variant.get("model") == model and isinstance(variant.get("version"), int):
                names = using.setdefault(variant["version"], [])
                if name not in names:
                    names.append(name)
    return using
