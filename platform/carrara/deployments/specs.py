"""Deployment specs: how a desired state is stored, validated and published, and the rules
read from it (champion, verdict metric, monitoring config). No revision is written here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from confluent_kafka import KafkaException
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.deployments.schemas import DeploymentPut, MonitoringConfig, Policy
from carrara.errors import Invalid, NotFound, Unavailable
from carrara.models import (
    Dataset,
    DatasetVersion,
    Deployment,
    ModelVersion,
    RegisteredModel,
    TrainingRun,
)
from carrara.registry import service as registry
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec
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
        version = resolve_version(session, v.name, v.model, v.version, v.alias)
        variant = {
            "name": v.name,
            "model": v.model,
            "version": version,
            "weight": v.weight,
            "shadow": v.shadow,
            "shadow_sample_pct": float(v.shadow_sample_pct or 100) if v.shadow else None,
        }
        # Only when set, so specs of untrusted versions keep their hash; marking a version
        # trusted (or not) makes the same file a new desired state.
        if registry.get_version(session, v.model, version).trusted_code:
            variant["trusted_code"] = True
        variants.append(variant)
    spec: dict[str, Any] = {
        "input_topic": body.input_topic,
        "output_topic": body.output_topic,
        "key_field": body.key_field,
        "pool": body.pool,
        "description": body.description,
        "variants": variants,
    }
    if body.output_format != "json":  # only when set: JSON specs keep their hash
        spec["output_format"] = body.output_format
    if body.include_features:  # likewise
        spec["include_features"] = True
    if body.monitoring is not None:
        spec["monitoring"] = body.monitoring.model_dump(mode="json")
    if body.policy is not None:
        spec["policy"] = body.policy.model_dump(mode="json")
    return spec


def topics_of(spec: dict[str, Any]) -> list[str]:
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


def check_metric(session: Session, spec: dict[str, Any]) -> None:
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


def resolve_version(
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


def validate_live(session: Session, spec: dict[str, Any], kafka_bootstrap: str) -> None:
    """Check that what a spec references still exists (models in Carrara, topics in Kafka)."""
    for v in spec["variants"]:
        resolve_version(session, v["name"], v["model"], v["version"], None)
    check_topics(kafka_bootstrap, topics_of(spec))


@dataclass(frozen=True)
class Pin:
    """What a scorer must know of a model version besides its name: the pinned digests of its
    files and whether an admin trusts it to run code (from Postgres, never from MLflow)."""

    artifact_digests: dict[str, str] | None
    trusted_code: bool


def pins_of(session: Session, spec: dict[str, Any] | None) -> dict[tuple[str, int], Pin]:
    """The pin of every model version a spec's variants name, as the registry holds it now."""
    pins: dict[tuple[str, int], Pin] = {}
    for v in (spec or {}).get("variants", []):
        key = (v["model"], int(v["version"]))
        if key not in pins:
            row = registry.get_version(session, *key)
            pins[key] = Pin(row.artifact_digests, row.trusted_code)
    return pins


def wire_spec(
    deployment: Deployment,
    number: int,
    spec: dict[str, Any] | None,
    published_at: datetime,
    pins: dict[tuple[str, int], Pin] | None = None,
) -> DeploymentSpec:
    """The deployments-topic record of revision `number` (a stop record when `spec` is None).

    Each variant carries its version's `pins` (digests, trusted code); a version without a pin
    gets none (its scorer loads only formats that run no code, without digest checks).
    """
    pins = pins or {}
    no_pin = Pin(None, False)
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
        output_format=spec.get("output_format", "json"),
        include_features=bool(spec.get("include_features", False)),
        variants=tuple(
            VariantSpec(
                name=v["name"],
                model_name=v["model"],
                model_version=v["version"],
                weight=v["weight"],
                shadow=v["shadow"],
                shadow_sample_pct=v["shadow_sample_pct"],
                artifact_digests=pins.get((v["model"], v["version"]), no_pin).artifact_digests,
                trusted_code=pins.get((v["model"], v["version"]), no_pin).trusted_code,
            )
            for v in spec["variants"]
        ),
    )
