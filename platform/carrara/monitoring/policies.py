"""Automatic promotion and rollback, decided by the sequential A/B test on joined outcomes.

Only outcomes of the current revision count (predictions made since it was created, by the model
versions it serves), so a decision is never based on traffic another configuration produced. The
evidence is the API's verdict (carrara.monitoring.verdict), and no action is taken before both the
champion and the challenger have the policy's `min_outcomes`: rollback and promotion alike.
Each action is a new deployment revision made through the same service as a `PUT` (validated,
audited with the evidence as its reason, published to scorers), plus an alert with the evidence.
"""

from __future__ import annotations

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.audit.service import MONITOR
from carrara.deployments import service as deployments
from carrara.deployments.schemas import DeploymentPut
from carrara.models import Deployment, DeploymentRevision
from carrara.monitoring.alerts import raise_alert
from carrara.monitoring.rules import policy_action
from carrara.monitoring.verdict import revision_evidence
from carrara.monitoring.watched import Watched
from carrara.settings import Settings

log = structlog.get_logger(__name__)


def apply_policies(session: Session, settings: Settings, watched: Watched) -> str | None:
    """Promote or roll back at most one challenger of `watched`; returns the action taken."""
    deployment = session.scalar(
        select(Deployment).where(Deployment.name == watched.name).with_for_update()
    )
    if deployment is None or deployment.stopped_at is not None:
        return None
    _, policy = deployments.monitoring_config(deployment)
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
    # Live challengers with traffic, each judged against the champion only once both arms have
    # the policy's `min_outcomes` (and at least the verdict's own minimum).
    found = revision_evidence(
        session,
        deployment.name,
        spec,
        revision.created_at,
        min_outcomes=policy.min_outcomes,
        challengers=[v["name"] for v in spec["variants"] if not v["shadow"] and v["weight"] > 0],
    )
    champion_name = found.champion
    for variant in spec["variants"]:
        ev = found.comparisons.get(variant["name"])
        if ev is None or (action := policy_action(ev, policy)) is None:
            continue
        evidence = {**ev.details(), "revision": revision.number}
        text = ev.text
        new_variants = [dict(v) for v in spec["variants"]]
        if action == "auto_rollback":
            for v in new_variants:
                if v["name"] == variant["name"]:
                    moved, v["weight"] = v["weight"], 0
            for v in new_variants:
                if v["name"] == champion_name:
                    v["weight"] += moved
            new_monitoring = spec.get("monitoring")
        else:
            for v in new_variants:
                if not v["shadow"]:
                    v["weight"] = 100 if v["name"] == variant["name"] else 0
            new_monitoring = {**(spec.get("monitoring") or {}), "champion": variant["name"]}
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
