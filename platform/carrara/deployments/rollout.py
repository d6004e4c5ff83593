"""A deployment's rollout: which scorer instances of its pool serve its current revision."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import Deployment, DeploymentRevision, ScorerInstance

# A scorer is live while its last status record is at most this many of its intervals old.
LIVE_INTERVALS = 3


@dataclass(frozen=True)
class ScorerRollout:
    """One scorer instance's part in a deployment's rollout."""

    instance: ScorerInstance
    status: dict[str, Any]  # its DeploymentStatus for the deployment
    live: bool
    up_to_date: bool


@dataclass(frozen=True)
class Rollout:
    desired_revision: int
    scorers: list[ScorerRollout]
    up_to_date: int
    total: int
    summary: str
    stalled: int = 0


def is_live(instance: ScorerInstance, now: datetime) -> bool:
    """Whether the instance is serving: not shutting down and heard from recently enough."""
    fresh = now - instance.seen_at <= timedelta(seconds=LIVE_INTERVALS * instance.interval_s)
    return fresh and not instance.stopping


def list_scorers(session: Session, pool: str | None = None) -> list[ScorerInstance]:
    """Every scorer instance the control plane knows (live or not), by pool and instance id."""
    stmt = select(ScorerInstance).order_by(ScorerInstance.pool, ScorerInstance.instance_id)
    if pool is not None:
        stmt = stmt.where(ScorerInstance.pool == pool)
    return list(session.scalars(stmt))


def _pool_of(session: Session, deployment: Deployment, current: DeploymentRevision) -> str | None:
    if current.spec is not None:
        return str(current.spec["pool"])
    # Stopped: the scorers that must stop it are those of the pool it last ran in. (A stop's
    # spec is a JSON null, not SQL NULL, so filter on the pool itself.)
    pool = DeploymentRevision.spec["pool"].astext
    return session.scalar(
        select(pool)
        .where(DeploymentRevision.deployment_id == deployment.id, pool.is_not(None))
        .order_by(DeploymentRevision.number.desc())
        .limit(1)
    )


def rollout(
    session: Session,
    deployment: Deployment,
    current: DeploymentRevision,
    now: datetime | None = None,
) -> Rollout:
    """Which scorers of the deployment's pool run its current revision, from their status.

    Only instances of the pool that report the deployment are listed; stale ones are listed with
    `live` false and left out of the counts.
    """
    now = now or datetime.now(UTC)
    desired = current.number
    stopped = current.spec is None
    pool = _pool_of(session, deployment, current)
    instances = (
        session.scalars(
            select(ScorerInstance)
            .where(
                ScorerInstance.pool == pool,
                # JSONB containment: the list has an element with this name (index-friendly).
                ScorerInstance.deployments.contains([{"name": deployment.name}]),
            )
            .order_by(ScorerInstance.instance_id)
        )
        if pool is not None
        else []
    )
    scorers = []
    for instance in instances:
        status = next(d for d in instance.deployments if d.get("name") == deployment.name)
        if stopped:
            # A stop is done when the scorer has seen the stop revision and stopped consuming.
            done = status.get("state") == "stopped" and status.get("desired_revision", 0) >= desired
        else:
            # A stalled scorer serves the revision but is not making progress: not done.
            done = status.get("served_revision") == desired and status.get("state") == "serving"
        scorers.append(ScorerRollout(instance, status, is_live(instance, now), done))
    total = sum(1 for s in scorers if s.live)
    up_to_date = sum(1 for s in scorers if s.live and s.up_to_date)
    stalled = sum(1 for s in scorers if s.live and s.status.get("state") == "stalled")
    summary = (
        f"{up_to_date}/{total} scorers have stopped it (revision {desired})"
        if stopped
        else f"{up_to_date}/{total} scorers on revision {desired}"
    )
    if stalled:
        summary += f", {stalled} stalled"
    return Rollout(desired, scorers, up_to_date, total, summary, stalled)
