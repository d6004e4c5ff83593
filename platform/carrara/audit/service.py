"""Record and query audit events; services call `record` in the same transaction as the change.

Every change is audited by the service that makes it, never by a router, so a change is audited
whoever makes it: an API call, a UI form, the training worker, or the monitor's policies. The actor
of an automatic change is a system principal without a token (`MONITOR`, the training `WORKER`),
and the evidence behind it is kept in the entry's `detail` (see `with_evidence`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.auth.principal import Principal
from carrara.auth.roles import Role
from carrara.models import AuditEvent
from carrara.pagination import PageParams, paginate

# The actor of the monitor process's automatic promotions and rollbacks (it has no API token).
MONITOR = Principal(token_id=None, name="monitor", role=Role.editor)
EVIDENCE_MARKER = "\nevidence: "


def with_evidence(detail: str, evidence: dict[str, Any] | None) -> str:
    """`detail`, followed by the evidence of an automatic action as one line of sorted JSON.

    `evidence_of(event.detail)` reads it back.
    """
    if not evidence:
        return detail
    return detail + EVIDENCE_MARKER + orjson.dumps(evidence, option=orjson.OPT_SORT_KEYS).decode()


def evidence_of(detail: str) -> dict[str, Any] | None:
    """The evidence `with_evidence` wrote into a detail, or None if it has none."""
    _, marker, data = detail.partition(EVIDENCE_MARKER)
    if not marker:
        return None
    value = orjson.loads(data)
    return value if isinstance(value, dict) else None


def record(
    session: Session,
    actor: Principal,
    action: str,
    resource_type: str,
    resource_id: str | int,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    detail: str = "",
) -> AuditEvent:
    event = AuditEvent(
        actor=actor.name,
        actor_token_id=actor.token_id,
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id),
        before=before,
        after=after,
        detail=detail,
    )
    session.add(event)
    return event


def list_events(
    session: Session,
    params: PageParams,
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
) -> tuple[list[AuditEvent], str | None]:
    stmt = select(AuditEvent)
    if resource_type:
        stmt = stmt.where(AuditEvent.resource_type == resource_type)
    if resource_id:
        stmt = stmt.where(AuditEvent.resource_id == resource_id)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if actor:
        stmt = stmt.where(AuditEvent.actor == actor)
    if since:
        stmt = stmt.where(AuditEvent.at >= since)
    return paginate(session, stmt, AuditEvent.id, params)
