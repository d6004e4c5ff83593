"""Declarative deployments: validate a desired state, store immutable revisions, publish them.

Every new revision is written with an outbox message in the same transaction, so it reaches the
compacted deployments topic after commit even if Kafka is briefly down (the relay retries).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from confluent_kafka import KafkaException
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, object_session

from carrara.deployments.schemas import DeploymentPut, MonitoringConfig, Policy
from carrara.errors import Conflict, Invalid, NotFound, Unavailable
from carrara.models import (
    Dataset,
    DatasetVersion,
    Deployment,
    DeploymentRevision,
    ModelVersion,
    RegisteredModel,
    ScorerInstance,
    TrainingRun,
)
from carrara.outbox.service import enqueue_kafka
from carrara.pagination import PageParams, paginate
from carrara.registry import service as registry
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, spec_to_dict
from carrara.streams.topics import TopicAdmin

TOPIC_CHECK_TIMEOUT_S = 5.0
CLASSIFICATION_TASKS = frozenset({"binary", "multiclass"})
# The tasks each verdict metric makes sense for (a model of unknown task accepts any).
METRIC_TASKS = {
    "log_loss": CLASSIFICATION_TASKS,
    "accuracy": CLASSIFICATION_TASKS,
    "rmse": frozenset({"regression"}),
    "mae": frozenset({"regression"}),
}
# A scorer is live while its last status record is at most this many of its intervals old.
LIVE_INTERVALS = 3


@dataclass(frozen=True)
class Publishing:
    """Where revisions go: the Kafka cluster (to check topics) and the deployments topic."""

    kafka_bootstrap: str
    deployments_topic: str


@dataclass
class Applied:
    deployment: Deployment
    revision: DeploymentRevision
    changed: bool
    before: dict[str, Any] | None


def spec_hash(spec: dict[str, Any] | None) -> str:
    """SHA-256 of the canonical JSON of a spec (sorted keys), so equal specs hash equal."""
    return hashlib.sha256(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()


def salt_for(deployment: Deployment) -> str:
    """The deployment's traffic-splitting salt: stable for its lifetime, distinct per deployment.

    Derived from the id as well as the name, so a deployment re-created under an old name (after
    its rows were removed) does not silently reuse the old assignment of entities to variants.
    """
    return hashlib.sha256(f"{deployment.id}:{deployment.name}".encode()).hexdigest()[:16]


def status_of(deployment: Deployment) -> str:
    return "stopped" if deployment.stopped_at is not None else "running"


def normalize(session: Session, body: DeploymentPut) -> dict[str, Any]:
    """The stored form of a desired state: aliases resolved, variants sorted by name.

    Sorting makes a reordered but otherwise equal file the same revision. The `reason` is about
    the change, not the state, so it is not part of the spec. `monitoring` and `policy` are stored
    with their defaults filled in, and only when given: a body without them keeps the spec (and
    its hash) of deployments made before they existed.
    """
    variants = []
    for v in sorted(body.variants, key=lambda v: v.name):
        variants.append(
            {
                "name": v.name,
                "model": v.model,
                "version": _resolve_version(session, v.name, v.model, v.version, v.alias),
                "weight": v.weight,
                "shadow": v.shadow,
                "shadow_sample_pct": float(v.shadow_sample_pct or 100) if v.shadow else None,
            }
        )
    spec: dict[str, Any] = {
        "input_topic": body.input_topic,
        "output_topic": body.output_topic,
        "key_field": body.key_field,
        "pool": body.pool,
        "description": body.description,
        "variants": variants,
    }
    if body.monitoring is not None:
        spec["monitoring"] = body.monitoring.model_dump(mode="json")
    if body.policy is not None:
        spec["policy"] = body.policy.model_dump(mode="json")
    return spec


def _topics_of(spec: dict[str, Any]) -> list[str]:
    """The Kafka topics a spec names: input, output, and the outcomes topic if it has one."""
    topics = [spec["input_topic"], spec["output_topic"]]
    outcomes = (spec.get("monitoring") or {}).get("outcomes_topic")
    if outcomes is not None:
        topics.append(outcomes)
    return topics


def model_task(session: Session, model: str, version: int) -> str | None:
    """The task (binary, multiclass, regression, anomaly) a model version was trained for.

    From the dataset of its training run, else from its feature profile's `task`; None when
    unknown (e.g. a version imported from MLflow without a profile).
    """
    row = session.execute(
        select(Dataset.task, ModelVersion.feature_profile)
        .select_from(ModelVersion)
        .join(RegisteredModel, ModelVersion.registered_model_id == RegisteredModel.id)
        .outerjoin(TrainingRun, ModelVersion.run_id == TrainingRun.id)
        .outerjoin(DatasetVersion, TrainingRun.dataset_version_id == DatasetVersion.id)
        .outerjoin(Dataset, DatasetVersion.dataset_id == Dataset.id)
        .where(RegisteredModel.name == model, ModelVersion.version == version)
    ).first()
    if row is None:
        return None
    task, profile = row
    if task is None and isinstance(profile, dict) and isinstance(profile.get("task"), str):
        task = profile["task"]
    return task


def champion_of(spec: dict[str, Any]) -> str:
    """The champion variant: the configured one, else the live variant with the largest weight.

    Ties go to the first name in order (variants are stored sorted by name).
    """
    configured = (spec.get("monitoring") or {}).get("champion")
    live = [v for v in spec["variants"] if not v["shadow"]]
    if configured is not None and any(v["name"] == configured for v in live):
        return str(configured)
    return str(max(live, key=lambda v: v["weight"])["name"])


def variant_of(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The stored variant `name` of a spec (KeyError if it has none)."""
    for v in spec["variants"]:
        if v["name"] == name:
            return dict(v)
    raise KeyError(name)


def champion_task(session: Session, spec: dict[str, Any]) -> str | None:
    """The task of the champion variant's model version (see `model_task`)."""
    champion = variant_of(spec, champion_of(spec))
    return model_task(session, champion["model"], champion["version"])


def verdict_metric(session: Session, spec: dict[str, Any]) -> str:
    """The A/B verdict's metric: the configured one, else rmse for regression, else log_loss.

    A model of unknown task counts as a classifier, as the monitor joins its outcomes as labels.
    """
    configured = (spec.get("monitoring") or {}).get("metric")
    if configured is not None:
        return str(configured)
    return "rmse" if champion_task(session, spec) == "regression" else "log_loss"


def _check_metric(session: Session, spec: dict[str, Any]) -> None:
    """Invalid if the configured verdict metric does not suit the champion model's task."""
    metric = (spec.get("monitoring") or {}).get("metric")
    if metric is None:
        return
    champion = variant_of(spec, champion_of(spec))
    task = model_task(session, champion["model"], champion["version"])
    # Unknown and anomaly models are accepted: nothing says which outcomes they will get.
    if task in CLASSIFICATION_TASKS | {"regression"} and task not in METRIC_TASKS[metric]:
        suits = " or ".join(sorted(METRIC_TASKS[metric]))
        raise Invalid(
            f"monitoring.metric '{metric}' needs a {suits} model, but champion "
            f"'{champion['name']}' ({champion['model']} v{champion['version']}) is a {task} model"
        )


def monitoring_config_of(
    spec: dict[str, Any] | None,
) -> tuple[MonitoringConfig | None, Policy | None]:
    """The monitoring config and policy stored in a revision's spec (None for each one absent)."""
    if spec is None:
        return None, None
    monitoring = spec.get("monitoring")
    policy = spec.get("policy")
    return (
        MonitoringConfig.model_validate(monitoring) if monitoring is not None else None,
        Policy.model_validate(policy) if policy is not None else None,
    )


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
    current = _current(session, deployment)
    return monitoring_config_of(current.spec if current is not None else None)


def _resolve_version(
    session: Session, variant: str, model: str, version: int | None, alias: str | None
) -> int:
    try:
        if alias is not None:
            return registry.resolve_alias(session, model, alias).version
        assert version is not None  # the schema requires exactly one of version and alias
        return registry.get_version(session, model, version).version
    except NotFound as exc:
        raise Invalid(f"variant '{variant}': {exc.detail}") from exc


def check_topics(kafka_bootstrap: str, topics: list[str]) -> None:
    """Invalid naming the topics Kafka does not have; Unavailable if Kafka does not answer."""
    admin = TopicAdmin(kafka_bootstrap)
    try:
        missing = [t for t in topics if not admin.partitions(t, timeout=TOPIC_CHECK_TIMEOUT_S)]
    except KafkaException as exc:
        raise Unavailable(f"Kafka at {kafka_bootstrap} is unreachable: {exc}") from exc
    if missing:
        raise Invalid(f"Kafka topic(s) do not exist: {', '.join(missing)}", missing=missing)


def _validate_live(session: Session, spec: dict[str, Any], publishing: Publishing) -> None:
    """Check that what a spec references still exists (models in Carrara, topics in Kafka)."""
    for v in spec["variants"]:
        _resolve_version(session, v["name"], v["model"], v["version"], None)
    check_topics(publishing.kafka_bootstrap, _topics_of(spec))


def _locked(session: Session, name: str) -> Deployment | None:
    # Row lock: concurrent changes of one deployment are serialized, so revision numbers never
    # collide; populate_existing refreshes an instance the session already holds.
    return session.scalar(
        select(Deployment)
        .where(Deployment.name == name)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


def _current(session: Session, deployment: Deployment) -> DeploymentRevision | None:
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
    current = _current(session, deployment)
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


def _new_revision(
    session: Session,
    deployment: Deployment,
    spec: dict[str, Any] | None,
    reason: str,
    actor: str,
    publishing: Publishing,
) -> DeploymentRevision:
    now = datetime.now(UTC)
    revision = DeploymentRevision(
        deployment_id=deployment.id,
        number=deployment.current_revision + 1,
        spec=spec,
        spec_hash=spec_hash(spec),
        reason=reason,
        created_by=actor,
    )
    session.add(revision)
    deployment.current_revision = revision.number
    deployment.stopped_at = now if spec is None else None
    wire = wire_spec(deployment, revision.number, spec, now)
    # Same transaction as the revision: published after commit, never lost, never early.
    enqueue_kafka(session, publishing.deployments_topic, deployment.name, spec_to_dict(wire))
    session.flush()
    return revision


def wire_spec(
    deployment: Deployment, number: int, spec: dict[str, Any] | None, published_at: datetime
) -> DeploymentSpec:
    """The deployments-topic record of revision `number` (a stop record when `spec` is None)."""
    common = {
        "name": deployment.name,
        "revision": number,
        "salt": salt_for(deployment),
        "published_at": published_at,
    }
    if spec is None:
        return DeploymentSpec(**common, stopped=True)
    return DeploymentSpec(
        **common,
        input_topic=spec["input_topic"],
        output_topic=spec["output_topic"],
        key_field=spec["key_field"],
        pool=spec["pool"],
        variants=tuple(
            VariantSpec(
                name=v["name"],
                model_name=v["model"],
                model_version=v["version"],
                weight=v["weight"],
                shadow=v["shadow"],
                shadow_sample_pct=v["shadow_sample_pct"],
            )
            for v in spec["variants"]
        ),
    )


def apply(
    session: Session, name: str, body: DeploymentPut, actor: str, publishing: Publishing
) -> Applied:
    """Store `body` as the desired state of `name` if it differs from the current one.

    Same spec as the current running revision: nothing is stored (`changed` is False). A stopped
    deployment given a spec starts again with a new revision, even if the spec is its last one.
    """
    spec = normalize(session, body)
    _check_metric(session, spec)
    check_topics(publishing.kafka_bootstrap, _topics_of(spec))
    # ON CONFLICT DO NOTHING + row lock: two first PUTs of one name both succeed, one after
    # the other, instead of one failing on the unique name.
    session.execute(
        insert(Deployment)
        .values(name=name, current_revision=0)
        .on_conflict_do_nothing(index_elements=[Deployment.name])
    )
    deployment = _locked(session, name)
    assert deployment is not None  # inserted or already there, and locked
    current = _current(session, deployment)
    before = current.spec if current else None
    if (
        current is not None
        and deployment.stopped_at is None
        and current.spec_hash == spec_hash(spec)
    ):
        return Applied(deployment, current, changed=False, before=before)
    revision = _new_revision(session, deployment, spec, body.reason, actor, publishing)
    return Applied(deployment, revision, changed=True, before=before)


def rollback(
    session: Session, name: str, number: int, reason: str, actor: str, publishing: Publishing
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
    current = _current(session, deployment)
    assert current is not None
    if current.spec_hash == target.spec_hash:
        raise Conflict(f"deployment '{name}' already runs the spec of revision {number}")
    # Models or topics may have gone since revision `number` was made.
    _validate_live(session, target.spec, publishing)
    text = f"rollback to revision {number}" + (f": {reason}" if reason else "")
    revision = _new_revision(session, deployment, target.spec, text, actor, publishing)
    return Applied(deployment, revision, changed=True, before=current.spec)


def stop(session: Session, name: str, reason: str, actor: str, publishing: Publishing) -> Applied:
    """Stop a deployment: a new revision without a spec; Conflict if it is already stopped."""
    deployment = _locked(session, name)
    if deployment is None or deployment.current_revision == 0:
        raise NotFound(f"deployment '{name}' does not exist")
    if deployment.stopped_at is not None:
        raise Conflict(
            f"deployment '{name}' is already stopped (since revision {deployment.current_revision})"
        )
    current = _current(session, deployment)
    assert current is not None
    revision = _new_revision(session, deployment, None, reason or "stopped", actor, publishing)
    return Applied(deployment, revision, changed=True, before=current.spec)


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
            done = status.get("served_revision") == desired and status.get("state") == "serving"
        scorers.append(ScorerRollout(instance, status, is_live(instance, now), done))
    total = sum(1 for s in scorers if s.live)
    up_to_date = sum(1 for s in scorers if s.live and s.up_to_date)
    summary = (
        f"{up_to_date}/{total} scorers have stopped it (revision {desired})"
        if stopped
        else f"{up_to_date}/{total} scorers on revision {desired}"
    )
    return Rollout(desired, scorers, up_to_date, total, summary)
