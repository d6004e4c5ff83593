"""`/api/v1/audit`: the audit log (adapter over `audit.service`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from carrara.api_types import QueryDateTime
from carrara.audit import service
from carrara.audit.schemas import AuditEventOut
from carrara.deps import PageParamsDep, SessionDep, Viewer
from carrara.pagination import Page

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEventOut])
def list_audit_events(
    session: SessionDep,
    _: Viewer,
    params: PageParamsDep,
    resource_type: Annotated[str | None, Query(max_length=50)] = None,
    resource_id: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    since: Annotated[QueryDateTime | None, Query(description="Only changes at or after")] = None,
) -> Page[AuditEventOut]:
    """Every change, newest first: who, what, when, and before/after where it matters.

    Changes made by the platform itself are listed too: the monitor's automatic promotions and
    rollbacks (actor `monitor`, with the verdict's evidence in `detail`) and the training
    worker's run transitions (actor `training-worker`).
    """
    items, cursor = service.list_events(
        session,
        params,
        resource_type=resource_type,
        resource_id=resource_id,
        action=action,
        actor=actor,
        since=since,
    )
    return Page(items=[AuditEventOut.model_validate(i) for i in items], next_cursor=cursor)
