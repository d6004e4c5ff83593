"""`/api/v1/deployments` and `/api/v1/scorers`: adapters over `deployments.service` (which
validates, stores revisions, publishes them and audits every change).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response, status

from carrara.deployments import service
from carrara.deployments.schemas import (
    NAME_PATTERN,
    DeploymentApplied,
    DeploymentDetail,
    DeploymentOut,
    DeploymentPut,
    RevisionOut,
    RollbackIn,
    ScorerOut,
)
from carrara.deps import DeploymentName, Editor, PageParamsDep, SessionDep, SettingsDep, Viewer
from carrara.pagination import Page

router = APIRouter(prefix="/deployments", tags=["deployments"])
scorers_router = APIRouter(prefix="/scorers", tags=["scorers"])


@router.get("", response_model=Page[DeploymentOut])
def list_deployments(
    session: SessionDep,
    _: Viewer,
    params: PageParamsDep,
    status_: Annotated[
        Literal["running", "stopped"] | None, Query(alias="status", description="Filter")
    ] = None,
    name: Annotated[
        str | None, Query(max_length=100, description="Only names starting with this")
    ] = None,
) -> Page[DeploymentOut]:
    """Deployments, newest first, with their current revision."""
    return service.deployment_page(session, params, status_, name)


@router.put(
    "/{name}",
    response_model=DeploymentApplied,
    responses={201: {"model": DeploymentApplied, "description": "A new revision was stored"}},
)
def apply_deployment(
    name: DeploymentName,
    body: DeploymentPut,
    response: Response,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> DeploymentApplied:
    """Declare the desired state; a new revision (201) only if it differs, else 200 unchanged."""
    applied = service.apply(session, name, body, principal, service.publishing(settings))
    if applied.changed:
        response.status_code = status.HTTP_201_CREATED
    return service.applied_out(session, applied)


@router.get("/{name}", response_model=DeploymentDetail)
def get_deployment(name: DeploymentName, session: SessionDep, _: Viewer) -> DeploymentDetail:
    """The current revision's spec, whether it runs, and its rollout to the scorers."""
    return service.deployment_detail(session, name)


@router.get("/{name}/revisions", response_model=Page[RevisionOut])
def list_revisions(
    name: DeploymentName, session: SessionDep, _: Viewer, params: PageParamsDep
) -> Page[RevisionOut]:
    """The revision history, newest first: spec, who, when and why."""
    return service.revision_page(session, name, params)


@router.post("/{name}/rollback", response_model=DeploymentApplied, status_code=201)
def rollback_deployment(
    name: DeploymentName,
    body: RollbackIn,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> DeploymentApplied:
    """Make a new revision whose spec is an earlier revision's (restarts a stopped deployment)."""
    applied = service.rollback(
        session, name, body.revision, body.reason, principal, service.publishing(settings)
    )
    return service.applied_out(session, applied)


@router.delete("/{name}", response_model=DeploymentApplied)
def stop_deployment(
    name: DeploymentName,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
    reason: Annotated[str, Query(max_length=500, description="Why it is stopped")] = "",
) -> DeploymentApplied:
    """Stop the deployment: a new revision without a spec tells scorers to stop it."""
    applied = service.stop(session, name, reason, principal, service.publishing(settings))
    return service.applied_out(session, applied)


@scorers_router.get("", response_model=list[ScorerOut])
def list_scorers(
    session: SessionDep,
    _: Viewer,
    pool: Annotated[
        str | None, Query(pattern=NAME_PATTERN, max_length=100, description="Only this pool")
    ] = None,
) -> list[ScorerOut]:
    """Every scorer instance known from the status topic, live or stale, by pool and id."""
    return service.scorers(session, pool)
