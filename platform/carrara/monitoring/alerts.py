"""Alerts (kept in Postgres, published to the alerts topic through the outbox) and the checks that
raise them: input drift per feature, and the automatic promotion / rollback policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import Alert, FeatureDrift
from carrara.outbox.service import enqueue_kafka
from carrara.settings import Settings

if TYPE_CHECKING:
    from carrara.monitoring.monitor import Watched

log = structlog.get_logger(__name__)
# The same condition is not alerted again within this period.
QUIET_PERIOD = timedelta(hours=1)


def raise_alert(
    session: Session,
    settings: Settings,
    *,
    deployment: str,
    kind: str,
    severity: str,
    message: str,
    details: dict[str, Any],
    fingerprint: str,
) -> Alert | None:
    """Store and publish an alert, unless the same fingerprint fired within the quiet period."""
    since = datetime.now(UTC) - QUIET_PERIOD
    recent = session.scalar(
        select(Alert.id).where(Alert.fingerprint == fingerprint, Alert.at >= since).limit(1)
    )
    if recent is not None:
        return None
    alert = Alert(
        deployment=deployment,
        kind=kind,
        severity=severity,
        message=message,
        details=details,
        fingerprint=fingerprint,
    )
    session.add(alert)
    session.flush()
    enqueue_kafka(
        session,
        settings.alerts_topic,
        key=deployment,
        payload={
            "id": alert.id,
            "at": datetime.now(UTC).isoformat(),
            "deployment": deployment,
            "kind": kind,
            "severity": severity,
            "message": message,
            "details": details,
        },
    )
    log.warning("alert", deployment=deployment, kind=kind, message=message)
    return alert


def check_drift(session: Session, settings: Settings, w: Watched) -> list[Alert]:
    """PSI (and KS) of each feature's live values over the drift window vs. its training profile."""
    from carrara.monitoring.statistics import ks_statistic, psi

    if w.profile_version_id is None or not w.profiles:
        return []
    since = datetime.now(UTC) - timedelta(seconds=settings.drift_window_s)
    threshold = float((w.monitoring or {}).get("drift_psi_threshold") or 0.2)
    rows = session.scalars(
        select(FeatureDrift).where(
            FeatureDrift.deployment == w.name,
            FeatureDrift.model_version_id == w.profile_version_id,
            FeatureDrift.bucket_start >= since,
        )
    ).all()
    totals: dict[str, list[int]] = {}
    for row in rows:
        counts = totals.setdefault(row.feature, [0] * len(row.counts))
        totals[row.feature] = [a + b for a, b in zip(counts, row.counts, strict=False)]
    raised = []
    for feature, counts in totals.items():
        profile = w.profiles.get(feature)
        if profile is None or sum(counts) < settings.drift_min_events:
            continue
        value = psi(profile["shares"], counts)
        if value <= threshold:
            continue
        details: dict[str, Any] = {
            "feature": feature,
            "psi": round(value, 4),
            "threshold": threshold,
            "events": sum(counts),
            "window_s": settings.drift_window_s,
        }
        if profile.get("kind") == "numeric":
            details["ks"] = round(ks_statistic(profile["shares"], counts), 4)
        alert = raise_alert(
            session,
            settings,
            deployment=w.name,
            kind="drift",
            severity="warning",
            message=f"input drift on '{feature}': PSI {value:.2f} > {threshold:.2f} "
            f"over the last {settings.drift_window_s // 60} min ({sum(counts):,} events)",
            details=details,
            fingerprint=f"drift:{w.name}:{feature}",
        )
        if alert is not None:
            raised.append(alert)
    return raised


def check_alerts_and_policies(
    session: Session, settings: Settings, watched: dict[str, Watched]
) -> None:
    for w in watched.values():
        check_drift(session, settings, w)
        if (w.monitoring or {}) and (w.monitoring or {}).get("outcomes_topic"):
            try:
                from carrara.monitoring.policies import apply_policies
            except ImportError:
                continue
            apply_policies(session, settings, w)
