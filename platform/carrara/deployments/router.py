from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response, status
from sqlalchemy.orm import Session

from carrara.audit.service import record
from carrara.auth.dependencies import Editor, SessionDep, Viewer
from carrara.auth.service import Principal
from carrara.deployments import service
from carrara.deployments.schemas import (
    NAME_PATTERN,
    DeploymentApplied,
    DeploymentDetail,
    DeploymentName,
    DeploymentOut,
    DeploymentPut,
    DeploymentSpecOut,
    RevisionOut,
    RollbackIn,
    RolloutOut,
    RolloutScorerOut,
    ScorerDeploymentOut,
    ScorerOut,
)
from carrara.models import Deployment, DeploymentRevision, ScorerInstance
from carrara.pagination import Page, PageParams, page_params
from carrara.settings import Settings, get_settings

router = APIRouter(prefix="/deployments", tags=["deployments"])
scorers_router = APIRouter(prefix="/scorers", tags=["scorers"])
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _publishing(settings: Settings) -> service.Publishing:
    return service.Publishing(settings.kafka_bootstrap, settings.deployments_topic)


def _out(deployment: Deployment, current: DeploymentRevision) -> DeploymentOut:
    return DeploymentOut(
        name=deployment.name,
        status="stopped" if deployment.stopped_at is not None else "running",
        revision=current.number,
        spec=DeploymentSpecOut.model_validate(current.spec) if current.spec else None,
        salt=service.salt_for(deployment),
        created_at=deployment.created_at,
        updated_at=current.created_at,
        stopped_at=deployment.stopped_at,
    )


def _revision_out(row: DeploymentRevision) -> RevisionOut:
    return RevisionOut(
        number=row.number,
        stopped=row.spec is None,
        spec=DeploymentSpecOut.model_validate(row.spec) if row.spec else None,
        spec_hash=row.spec_hash,
        reason=row.reason,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def _rollout_out(rollout: service.Rollout) -> RolloutOut:
    return RolloutOut(
        desired_revision=rollout.desired_revision,
        scorers=[
            RolloutScorerOut(
                instance_id=s.instance.instance_id,
                pool=s.instance.pool,
                host=s.instance.host,
                served_revision=s.status.get("served_revision"),
                state=s.status.get("state", ""),
                loaded_versions=s.status.get("loaded_versions", []),
                last_error=s.status.get("last_error"),
                events_scored=s.status.get("events_scored", 0),
                dead_letters=s.status.get("dead_letters", 0),
                seen_at=s.instance.seen_at,
                live=s.live,
            )
            for s in rollout.scorers
        ],
        up_to_date=rollout.up_to_date,
        total=rollout.total,
        summary=rollout.summary,
    )


def _scorer_out(instance: ScorerInstance, now: datetime) -> ScorerOut:
    return ScorerOut(
        instance_id=instance.instance_id,
        pool=instance.pool,
        host=instance.host,
        started_at=instance.started_at,
        updated_at=instance.updated_at,
        seen_at=instance.seen_at,
        interval_s=instance.interval_s,
        stopping=instance.stopping,
        live=service.is_live(instance, now),
        deployments=[ScorerDeploymentOut.model_validate(d) for d in instance.deployments],
    )


def _audit(session: Session, principal: Principal, action: str, applied: service.Applied) -> None:
    revision = applied.revision
    detail = f"revision {revision.number}" + ("" if applied.changed else " (unchanged)")
    record(
        session,
        principal,
        action,
        "deployment",
        applied.deployment.name,
        before=applied.before,
        after=revision.spec,
        detail=f"{detail}: {revision.reason}" if revision.reason else detail,
    )


def _applied_out(session: Session, applied: service.Applied) -> DeploymentApplied:
    # Refresh server-side defaults (created_at) of rows inserted in this transaction.
    session.refresh(applied.deployment)
    session.refresh(applied.revision)
    out = _out(applied.deployment, applied.revision)
    return DeploymentApplied(**out.model_dump(), changed=applied.changed)


@router.get("", response_model=Page[DeploymentOut])
def list_deployments(
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
    status_: Annotated[
        Literal["running", "stopped"] | None, Query(alias="status", description="Filter")
    ] = None,
    name: Annotated[
        str | None, Query(max_length=100, description="Only names starting with this")
    ] = None,
) -> Page[DeploymentOut]:
    """Deployments, newest first, with their current revision."""
    items, cursor = service.list_deployments(session, params, status_, name)
    return Page(items=[_out(d, r) for d, r in items], next_cursor=cursor)


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
    applied = service.apply(session, name, body, principal.name, _publishing(settings))
    _audit(session, principal, "deployment.apply", applied)
    if applied.changed:
        response.status_code = status.HTTP_201_CREATED
    return _applied_out(session, applied)


@router.get("/{name}", response_model=DeploymentDetail)
def get_deployment(name: DeploymentName, session: SessionDep, _: Viewer) -> DeploymentDetail:
    """The current revision's spec, whether it runs, and its rollout to the scorers."""
    deployment, current = service.get_deployment(session, name)
    rollout = service.rollout(session, deployment, current)
    return DeploymentDetail(**_out(deployment, current).model_dump(), rollout=_rollout_out(rollout))


@router.get("/{name}/revisions", response_model=Page[RevisionOut])
def list_revisions(
    name: DeploymentName,
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
) -> Page[RevisionOut]:
    """The revision history, newest first: spec, who, when and why."""
    items, cursor = service.list_revisions(session, name, params)
    return Page(items=[_revision_out(r) for r in items], next_cursor=cursor)


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
        session, name, body.revision, body.reason, principal.name, _publishing(settings)
    )
    _audit(session, principal, "deployment.rollback", applied)
    return _applied_out(session, applied)


@router.delete("/{name}", response_model=DeploymentApplied)
def stop_deployment(
    name: DeploymentName,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
    reason: Annotated[str, Query(max_length=500, description="Why it is stopped")] = "",
) -> DeploymentApplied:
    """Stop the deployment: a new revision without a spec tells scorers to stop it."""
    applied = service.stop(session, name, reason, principal.name, _publishing(settings))
    _audit(session, principal, "deployment.stop", applied)
    return _applied_out(session, applied)


@scorers_router.get("", response_model=list[ScorerOut])
def list_scorers(
    session: SessionDep,
    _: Viewer,
    pool: Annotated[
        str | None, Query(pattern=NAME_PATTERN, max_length=100, description="Only this pool")
    ] = None,
) -> list[ScorerOut]:
    """Every scorer instance known from the status topic, live or stale, by pool and id."""
    now = datetime.now(UTC)
    return [_scorer_out(i, now) for i in service.list_scorers(session, pool)]
