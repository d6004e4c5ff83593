"""Automatic promotion and rollback, decided by the sequential A/B test on joined outcomes.

Only outcomes of the current revision count (predictions made since it was created, by the model
versions it serves), so a decision is never based on traffic another configuration produced.
Each action is a new deployment revision made through the same service as a `PUT` (validated,
audited with the evidence as its reason, published to scorers), plus an alert with the evidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.audit.service import MONITOR
from carrara.deployments import service as deployments
from carrara.deployments.schemas import DeploymentPut
from carrara.models import Deployment, DeploymentRevision, JoinedOutcome
from carrara.monitoring.alerts import raise_alert
from carrara.monitoring.rules import per_row_values
from carrara.monitoring.statistics import sequential_test, verdict_text
from carrara.monitoring.watched import Watched
from carrara.settings import Settings

log = structlog.get_logger(__name__)


def _values(
    session: Session, name: str, variant: dict[str, Any], since: Any, metric: str, task: str | None
) -> np.ndarray:
    rows = session.execute(
        select(JoinedOutcome.score, JoinedOutcome.outcome, JoinedOutcome.correct).where(
            JoinedOutcome.deployment == name,
            JoinedOutcome.variant == variant["name"],
            JoinedOutcome.model_version == variant["version"],
            JoinedOutcome.predicted_at >= since,
        )
    ).all()
    if not rows:
        return np.empty(0)
    scores = np.array([r[0] for r in rows], dtype=np.float64)
    outcomes = np.array([r[1] for r in rows], dtype=np.float64)
    correct = np.array([bool(r[2]) for r in rows], dtype=bool)
    return per_row_values(metric, task, scores, outcomes, correct)


def apply_policies(session: Session, settings: Settings, watched: Watched) -> str | None:
    """Promote or roll back at most one challenger of `watched`; returns the action taken."""
    deployment = session.scalar(
        select(Deployment).where(Deployment.name == watched.name).with_for_update()
    )
    if deployment is None or deployment.stopped_at is not None:
        return None
    monitoring, policy = deployments.monitoring_config(deployment)
    if policy is None or not (policy.auto_promote or policy.auto_rollback):
        return None
    revision = session.scalar(
        select(DeploymentRevision).where(
            DeploymentRevision.deployment_id == deployment.id,
            DeploymentRevision.number == deployment.current_revision,
        )
    )
    if revision is None or not revision.spec:
        return None
    spec = revision.spec
    metric = deployments.verdict_metric(session, spec)
    champion_name = deployments.champion_of(spec)
    variants = {v["name"]: v for v in spec["variants"]}
    champion = variants[champion_name]
    alpha = monitoring.alpha if monitoring is not None else 0.05
    task = deployments.champion_task(session, spec)
    champion_values = _values(session, deployment.name, champion, revision.created_at, metric, task)
    for variant in spec["variants"]:
        if variant["shadow"] or variant["name"] == champion_name or variant["weight"] == 0:
            continue
        challenger_values = _values(
            session, deployment.name, variant, revision.created_at, metric, task
        )
        result = sequential_test(champion_values, challenger_values, metric=metric, alpha=alpha)
        if not result.significant:
            continue
        evidence = {
            "metric": metric,
            "champion": champion_name,
            "challenger": variant["name"],
            "n_champion": result.n_champion,
            "n_challenger": result.n_challenger,
            "mean_champion": result.mean_champion,
            "mean_challenger": result.mean_challenger,
            "ci": [result.ci_low, result.ci_high],
            "p_value": result.p_value,
            "revision": revision.number,
        }
        text = verdict_text(result, champion_name, variant["name"])
        new_variants = [dict(v) for v in spec["variants"]]
        if result.better == "champion" and policy.auto_rollback:
            action = "auto_rollback"
            for v in new_variants:
                if v["name"] == variant["name"]:
                    moved, v["weight"] = v["weight"], 0
            for v in new_variants:
                if v["name"] == champion_name:
                    v["weight"] += moved
            new_monitoring = spec.get("monitoring")
        elif (
            result.better == "challenger"
            and policy.auto_promote
            and result.n_challenger >= policy.min_outcomes
        ):
            action = "auto_promote"
            for v in new_variants:
                if not v["shadow"]:
                    v["weight"] = 100 if v["name"] == variant["name"] else 0
            new_monitoring = {**(spec.get("monitoring") or {}), "champion": variant["name"]}
        else:
            continue
        body = DeploymentPut.model_validate(
            {
                **{k: spec[k] for k in ("input_topic", "output_topic", "key_field", "pool")},
                "description": spec.get("description", ""),
                "variants": [
                    {k: v[k] for k in ("name", "model", "version", "weight", "shadow")}
                    | ({"shadow_sample_pct": v["shadow_sample_pct"]} if v["shadow"] else {})
                    for v in new_variants
                ],
                "monitoring": new_monitoring,
                "policy": spec.get("policy"),
                "reason": f"{action.replace('_', '-')}: {text}"[:500],
            }
        )
        # Audited by the deployments service: actor "monitor", the verdict's evidence in detail.
        applied = deployments.apply(
            session,
            deployment.name,
            body,
            MONITOR,
            deployments.publishing(settings),
            action=f"deployment.{action}",
            evidence=evidence,
        )
        raise_alert(
            session,
            settings,
            deployment=deployment.name,
            kind=action,
            severity="warning" if action == "auto_rollback" else "info",
            message=f"{action.replace('_', ' ')} of '{variant['name']}': {text}",
            details={**evidence, "new_revision": applied.revision.number},
            fingerprint=f"{action}:{deployment.name}:{variant['name']}:{revision.number}",
        )
        log.warning("policy action", deployment=deployment.name, action=action, evidence=evidence)
        return action
    return None
