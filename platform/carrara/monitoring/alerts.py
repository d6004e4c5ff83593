"""Alerts: kept in Postgres, published to the alerts topic through the outbox, listed by the API.

Raised by the drift check here and by the automatic policies (carrara.monitoring.policies), which
the monitor's housekeeping runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import Alert
from carrara.monitoring.drift import live_counts
from carrara.monitoring.queries import utc
from carrara.monitoring.rules import feature_drift
from carrara.monitoring.watched import Watched
from carrara.outbox.service import enqueue_kafka
from carrara.pagination import PageParams, paginate
from carrara.settings import Settings

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
    """PSI (and KS) of each feature's live values over the drift window vs. its training profile.

    A feature with fewer than `settings.drift_min_events` live values in the window is not judged.
    """
    if w.profile_version_id is None or not w.profiles:
        return []
    since = datetime.now(UTC) - timedelta(seconds=settings.drift_window_s)
    threshold = w.config.drift_psi_threshold
    live = live_counts(session, w.name, w.profile_version_id, since, None)
    raised = []
    for feature, counts in live.counts.items():
        profile = w.profiles.get(feature)
        if profile is None or sum(counts) < settings.drift_min_events:
            continue
        result = feature_drift(profile, counts, threshold)
        if not result.drifted or result.psi is None:
            continue
        details: dict[str, Any] = {
            "feature": feature,
            "psi": round(result.psi, 4),
            "threshold": threshold,
            "events": result.live_count,
            "window_s": settings.drift_window_s,
        }
        if result.ks is not None:
            details["ks"] = round(result.ks, 4)
        alert = raise_alert(
            session,
            settings,
            deployment=w.name,
            kind="drift",
            severity="warning",
            message=f"input drift on '{feature}': PSI {result.psi:.2f} > {threshold:.2f} "
            f"over the last {settings.drift_window_s // 60} min ({result.live_count:,} events)",
            details=details,
            fingerprint=f"drift:{w.name}:{feature}",
        )
        if alert is not None:
            raised.append(alert)
    return raised


def list_alerts(
    session: Session,
    params: PageParams,
    *,
    deployment: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
) -> tuple[list[Alert], str | None]:
    """Alerts newest first, filtered by deployment, kind and time."""
    stmt = select(Alert)
    if deployment:
        stmt = stmt.where(Alert.deployment == deployment)
    if kind:
        stmt = stmt.where(Alert.kind == kind)
    if since is not None:
        stmt = stmt.where(Alert.at >= utc(since))
    return paginate(session, stmt, Alert.id, params)
