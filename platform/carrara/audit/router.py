from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from carrara.audit import service
from carrara.audit.schemas import AuditEventOut
from carrara.auth.dependencies import SessionDep, Viewer
from carrara.pagination import Page, PageParams, page_params

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEventOut])
def list_audit_events(
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
    resource_type: Annotated[str | None, Query(max_length=50)] = None,
    resource_id: Annotated[str | None, Query(max_length=200)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    since: datetime | None = None,
) -> Page[AuditEventOut]:
    """Every mutating call, newest first: who, what, when, and before/after where it matters."""
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
