"""Deployment revisions: apply a desired state, roll back, stop; each change is a new immutable
revision, published through the outbox and audited in the same transaction, whoever makes it.

Every new revision is written with an outbox message in the same transaction, so it reaches the
compacted deployments topic after commit even if Kafka is briefly down (the relay retries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, object_session

from carrara.audit.service import record, with_evidence
from carrara.auth.principal import Principal
from carrara.deployments.schemas import DeploymentPut, MonitoringConfig, Policy
from carrara.deployments.specs import (
    TOPIC_CHECK_TIMEOUT_S,
    check_metric,
    check_topics,
    monitoring_config_of,
    normalize,
    pins_of,
    spec_hash,
    topics_of,
    validate_live,
    wire_spec,
)
from carrara.errors import Conflict, Invalid, NotFound
from carrara.models import Deployment, DeploymentRevision
from carrara.outbox.service import enqueue_kafka
from carrara.pagination import PageParams, paginate
from carrara.streams.deployment_spec import spec_to_dict
from carrara.streams.topics import TopicAdmin
from carrara.topic_policy import TopicPolicy


@dataclass(frozen=True)
class Publishing:
    """Where revisions go: the Kafka cluster (to check topics) and the deployments topic."""

    kafka_bootstrap: str
    deployments_topic: str
    # Which topics deployments may use (never Carrara's or Kafka's internal ones).
    topics: TopicPolicy = field(default_factory=TopicPolicy)


def check_topic_policy(publishing: Publishing, spec: dict[str, Any]) -> None:
    """Invalid (422) naming each field of `spec` whose topic its pool may not use."""
    publishing.topics.check(
        {
            "input_topic": spec["input_topic"],
            "output_topic": spec["output_topic"],
            "monitoring.outcomes_topic": (spec.get("monitoring") or {}).get("outcomes_topic"),
        },
        spec.get("pool"),
    )


@dataclass
class Applied:
    deployment: Deployment
    revision: DeploymentRevision
    changed: bool
    before: dict[str, Any] | None


def _locked(session: Session, name: str) -> Deployment | None:
    # Row lock: concurrent changes of one deployment are serialized, so revision numbers never
    # collide; populate_existing refreshes an instance the session already holds.
    return session.scalar(
        select(Deployment)
        .where(Deployment.name == name)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def current_revision(session: Session, deployment: Deployment) -> DeploymentRevision | None:
    return session.scalar(
        select(DeploymentRevision).where(
            DeploymentRevision.deployment_id == deployment.id,
            DeploymentRevision.number == deployment.current_revision,
        )
    )


def get_deployment(session: Session, name: str) -> tuple[Deployment, DeploymentRevision]:
    """A deployment and its current revision; NotFound if there is none of that name."""
    deployment = session.scalar(select(Deployment).where(Deployment.name == name))
    if deployment is None:
        raise NotFound(f"deployment '{name}' does not exist")
    current = current_revision(session, deployment)
    if current is None:  # only inside the transaction that creates it
        raise NotFound(f"deployment '{name}' has no revision yet")
    return deployment, current


def list_deployments(
    session: Session,
    params: PageParams,
    status: str | None = None,
    name_prefix: str | None = None,
) -> tuple[list[tuple[Deployment, DeploymentRevision]], str | None]:
    """Deployments newest first with their current revisions, filtered by status or name."""
    stmt = select(Deployment).where(Deployment.current_revision > 0)
    if status == "running":
        stmt = stmt.where(Deployment.stopped_at.is_(None))
    elif status == "stopped":
        stmt = stmt.where(Deployment.stopped_at.is_not(None))
    if name_prefix:
        stmt = stmt.where(Deployment.name.startswith(name_prefix, autoescape=True))
    items, cursor = paginate(session, stmt, Deployment.id, params)
    revisions: dict[tuple[int, int], DeploymentRevision] = {}
    if items:
        rows = session.scalars(
            select(DeploymentRevision).where(
                DeploymentRevision.deployment_id.in_([d.id for d in items])
            )
        )
        revisions = {(r.deployment_id, r.number): r for r in rows}
    return [(d, revisions[(d.id, d.current_revision)]) for d in items], cursor


def list_revisions(
    session: Session, name: str, params: PageParams
) -> tuple[list[DeploymentRevision], str | None]:
    """The revision history of deployment `name`, newest first."""
    deployment, _ = get_deployment(session, name)
    stmt = select(DeploymentRevision).where(DeploymentRevision.deployment_id == deployment.id)
    return paginate(session, stmt, DeploymentRevision.id, params)


def monitoring_config(deployment: Deployment) -> tuple[MonitoringConfig | None, Policy | None]:
    """What the monitor process needs of a deployment: its current monitoring config and policy.

    Reads the current revision through the session `deployment` is attached to. Returns
    (None, None) for a stopped deployment, and None for whichever object its spec lacks: no
    `monitoring` means no outcome join (metrics and drift with the defaults of
    `MonitoringConfig()`), no `policy` means no automatic action. Pair with `champion_of(spec)`
    and `verdict_metric(session, spec)` for the defaults the config leaves open.
    """
    session = object_session(deployment)
    if session is None:
        raise ValueError(f"deployment '{deployment.name}' is not attached to a session")
    current = current_revision(session, deployment)
    return monitoring_config_of(current.spec if current is not None else None)


def get_revision(session: Session, name: str, number: int) -> DeploymentRevision:
    """Revision `number` of deployment `name`; NotFound naming what is missing."""
    deployment, _ = get_deployment(session, name)
    revision = session.scalar(
        select(DeploymentRevision).where(
            DeploymentRevision.deployment_id == deployment.id,
            DeploymentRevision.number == number,
        )
    )
    if revision is None:
        raise NotFound(f"deployment '{name}' has no revision {number}")
    return revision


def _new_revision(
    session: Session,
    deployment: Deployment,
    spec: dict[str, Any] | None,
    reason: str,
    actor: Principal,
    publishing: Publishing,
) -> DeploymentRevision:
    now = datetime.now(UTC)
    revision = DeploymentRevision(
        deployment_id=deployment.id,
        number=deployment.current_revision + 1,
        spec=spec,
        spec_hash=spec_hash(spec),
        reason=reason,
        created_by=actor.name,
    )
    session.add(revision)
    deployment.current_revision = revision.number
    deployment.stopped_at = now if spec is None else None
    # The versions' digests and trust as the registry holds them when the revision is made.
    wire = wire_spec(deployment, revision.number, spec, now, pins_of(session, spec))
    # Same transaction as the revision: published after commit, never lost, never early.
    enqueue_kafka(session, publishing.deployments_topic, deployment.name, spec_to_dict(wire))
    session.flush()
    return revision


def republish(session: Session, publishing: Publishing) -> int:
    """Publish the current revision of every deployment again; returns how many.

    For when the records on the deployments topic must be replaced without a change of desired
    state: after a signing key is configured (the relay signs the new records, so scorers that
    verify accept them) or the topic was lost. Scorers already serving a revision ignore it.
    """
    count = 0
    now = datetime.now(UTC)
    for deployment in session.scalars(select(Deployment).where(Deployment.current_revision > 0)):
        current = current_revision(session, deployment)
        if current is None:
            continue
        pins = pins_of(session, current.spec)
        wire = wire_spec(deployment, current.number, current.spec, now, pins)
        enqueue_kafka(session, publishing.deployments_topic, deployment.name, spec_to_dict(wire))
        count += 1
    return count


def _audit(
    session: Session,
    actor: Principal,
    action: str,
    applied: Applied,
    evidence: dict[str, Any] | None = None,
) -> Applied:
    """Record `applied` in the audit log (also when nothing changed), with any evidence."""
    revision = applied.revision
    detail = f"revision {revision.number}" + ("" if applied.changed else " (unchanged)")
    if revision.reason:
        detail = f"{detail}: {revision.reason}"
    record(
        session,
        actor,
        action,
        "deployment",
        applied.deployment.name,
        before=applied.before,
        after=revision.spec,
        detail=with_evidence(detail, evidence),
    )
    session.flush()
    return applied


def apply(
    session: Session,
    name: str,
    body: DeploymentPut,
    actor: Principal,
    publishing: Publishing,
    *,
    action: str = "deployment.apply",
    evidence: dict[str, Any] | None = None,
    created_topics: frozenset[str] = frozenset(),
) -> Applied:
    """Store `body` as the desired state of `name` if it differs from the current one.

    Same spec as the current running revision: nothing is stored (`changed` is False). A stopped
    deployment given a spec starts again with a new revision, even if the spec is its last one.
    Audited either way as `action` by `actor`; an automatic change (the monitor's policies)
    passes its own action and the `evidence` that triggered it, kept in the audit entry.
    `created_topics`: topics the caller creates before applying for real (a preview's dry run
    does not require them to exist yet).
    """
    spec = normalize(session, body)
    check_topic_policy(publishing, spec)
    check_metric(session, spec)
    check_topics(
        publishing.kafka_bootstrap, [t for t in topics_of(spec) if t not in created_topics]
    )
    # ON CONFLICT DO NOTHING + row lock: two first PUTs of one name both succeed, one after
    # the other, instead of one failing on the unique name.
    session.execute(
        insert(Deployment)
        .values(name=name, current_revision=0)
        .on_conflict_do_nothing(index_elements=[Deployment.name])
    )
    deployment = _locked(session, name)
    assert deployment is not None  # inserted or already there, and locked
    current = current_revision(session, deployment)
    before = current.spec if current else None
    if (
        current is not None
        and deployment.stopped_at is None
        and current.spec_hash == spec_hash(spec)
    ):
        applied = Applied(deployment, current, changed=False, before=before)
    else:
        revision = _new_revision(session, deployment, spec, body.reason, actor, publishing)
        applied = Applied(deployment, revision, changed=True, before=before)
    return _audit(session, actor, action, applied, evidence)


def rollback(
    session: Session,
    name: str,
    number: int,
    reason: str,
    actor: Principal,
    publishing: Publishing,
) -> Applied:
    """A new revision whose spec is revision `number`'s; Conflict if that is the current spec."""
    deployment = _locked(session, name)
    if deployment is None or deployment.current_revision == 0:
        raise NotFound(f"deployment '{name}' does not exist")
    target = session.scalar(
        select(DeploymentRevision).where(
            DeploymentRevision.deployment_id == deployment.id,
            DeploymentRevision.number == number,
        )
    )
    if target is None:
        raise NotFound(
            f"deployment '{name}' has no revision {number} "
            f"(revisions 1 to {deployment.current_revision})"
        )
    if target.spec is None:
        raise Invalid(f"revision {number} of '{name}' is a stop; to stop it, DELETE the deployment")
    current = current_revision(session, deployment)
    assert current is not None
    if current.spec_hash == target.spec_hash:
        raise Conflict(f"deployment '{name}' already runs the spec of revision {number}")
    # Models or topics may have gone (or been forbidden) since revision `number` was made.
    check_topic_policy(publishing, target.spec)
    validate_live(session, target.spec, publishing.kafka_bootstrap)
    text = f"rollback to revision {number}" + (f": {reason}" if reason else "")
    revision = _new_revision(session, deployment, target.spec, text, actor, publishing)
    applied = Applied(deployment, revision, changed=True, before=current.spec)
    return _audit(session, actor, "deployment.rollback", applied)


def stop(
    session: Session, name: str, reason: str, actor: Principal, publishing: Publishing
) -> Applied:
    """Stop a deployment: a new revision without a spec; Conflict if it is already stopped."""
    deployment = _locked(session, name)
    if deployment is None or deployment.current_revision == 0:
        raise NotFound(f"deployment '{name}' does not exist")
    if deployment.stopped_at is not None:
        raise Conflict(
            f"deployment '{name}' is already stopped (since revision {deployment.current_revision})"
        )
    current = current_revision(session, deployment)
    assert current is not None
    revision = _new_revision(session, deployment, None, reason or "stopped", actor, publishing)
    applied = Applied(deployment, revision, changed=True, before=current.spec)
    return _audit(session, actor, "deployment.stop", applied)


def last_spec_revision(session: Session, deployment: Deployment) -> DeploymentRevision | None:
    """The newest revision with a spec: what a stopped deployment ran last (None: never ran)."""
    return session.scalar(
        select(DeploymentRevision)
        .where(
            DeploymentRevision.deployment_id == deployment.id,
            DeploymentRevision.spec_hash != spec_hash(None),
        )
        .order_by(DeploymentRevision.number.desc())
        .limit(1)
    )


def restart(
    session: Session, name: str, reason: str, actor: Principal, publishing: Publishing
) -> Applied:
    """Start a stopped deployment again: a new revision with the spec it ran last.

    Conflict if it is running. The spec is checked as a rollback's is (topics and models may have
    gone since it stopped).
    """
    deployment = _locked(session, name)
    if deployment is None or deployment.current_revision == 0:
        raise NotFound(f"deployment '{name}' does not exist")
    if deployment.stopped_at is None:
        raise Conflict(f"deployment '{name}' is running (revision {deployment.current_revision})")
    last = last_spec_revision(session, deployment)
    if last is None or last.spec is None:
        raise Invalid(f"deployment '{name}' never ran a spec: apply one to start it")
    check_topic_policy(publishing, last.spec)
    validate_live(session, last.spec, publishing.kafka_bootstrap)
    text = f"restart with revision {last.number}'s spec" + (f": {reason}" if reason else "")
    revision = _new_revision(session, deployment, last.spec, text, actor, publishing)
    applied = Applied(deployment, revision, changed=True, before=None)
    return _audit(session, actor, "deployment.restart", applied)


def check_output_topic_creation(
    publishing: Publishing, topic: str, partitions: int, pool: str | None
) -> TopicAdmin:
    """Invalid (on `output_topic`) unless `topic` may be created: allowed, bounded, new."""
    problem = publishing.topics.problem(topic, pool)
    if problem is not None:
        raise Invalid(problem, errors=[{"field": "output_topic", "message": problem}])
    publishing.topics.check_creation([(topic, partitions)])
    admin = TopicAdmin(publishing.kafka_bootstrap)
    existing = admin.partitions(topic, timeout=TOPIC_CHECK_TIMEOUT_S)
    if existing:
        message = (
            f"topic '{topic}' already exists (with {len(existing)} partitions): "
            "leave “create it” unticked to use it"
        )
        raise Invalid(message, errors=[{"field": "output_topic", "message": message}])
    return admin


def create_output_topic(
    publishing: Publishing, topic: str, partitions: int, pool: str | None
) -> None:
    """Create a deployment's output topic, within the topic policy and the creation bounds."""
    admin = check_output_topic_creation(publishing, topic, partitions, pool)
    admin.create_topic(topic, partitions)
