"""Record and query audit events; services call `record` in the same transaction as the change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.auth.service import Principal
from carrara.models import AuditEvent
from carrara.pagination import PageParams, paginate


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
