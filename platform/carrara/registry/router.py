"""`/api/v1/models`: adapters over `registry.service` (which talks to MLflow and audits)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from carrara.deps import (
    Admin,
    AliasName,
    Editor,
    ModelName,
    PageParamsDep,
    SessionDep,
    SettingsDep,
    VersionNumber,
    Viewer,
)
from carrara.pagination import Page
from carrara.registry import service, views
from carrara.registry.mlflow_sync import registry_client
from carrara.registry.schemas import (
    AliasOut,
    ModelOut,
    ModelSummary,
    SyncOut,
    TrustIn,
    VersionOut,
    VersionRef,
)

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=Page[ModelSummary])
def list_models(
    session: SessionDep,
    _: Viewer,
    params: PageParamsDep,
    name: Annotated[
        str | None, Query(max_length=200, description="Only models whose name starts with this")
    ] = None,
) -> Page[ModelSummary]:
    """Registered models, newest first, with their latest version and aliases."""
    return views.model_summaries(session, params, name)


@router.get("/{name}", response_model=ModelOut)
def get_model(name: ModelName, session: SessionDep, _: Viewer) -> ModelOut:
    """A registered model: versions (newest first) with lineage and metrics, and its aliases."""
    return views.model_detail(session, name)


@router.get("/{name}/versions/{version}", response_model=VersionOut)
def get_version(
    name: ModelName, version: VersionNumber, session: SessionDep, _: Viewer
) -> VersionOut:
    """One version: lineage (run -> dataset snapshot and offsets), metrics, aliases."""
    return views.version_detail(session, name, version)


@router.post("/{name}/versions", response_model=VersionOut, status_code=status.HTTP_201_CREATED)
def import_version(
    name: ModelName,
    body: VersionRef,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> VersionOut:
    """Import an existing MLflow registry version (a model trained outside Carrara)."""
    client = registry_client(settings.mlflow_url)
    row = service.import_version(session, client, name, body.version, principal)
    return views.version_detail(session, name, row.version)


@router.put("/{name}/versions/{version}/trust", response_model=VersionOut)
def set_trust(
    name: ModelName, version: VersionNumber, body: TrustIn, session: SessionDep, principal: Admin
) -> VersionOut:
    """Admins only, audited: allow (or forbid) scorers to load the version from formats that
    execute code (pickle, cloudpickle, pyfunc). Effective from the deployment's next revision."""
    service.set_trusted_code(session, name, version, body.trusted_code, body.reason, principal)
    return views.version_detail(session, name, version)


@router.put("/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(
    name: ModelName,
    alias: AliasName,
    body: VersionRef,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> AliasOut:
    """Point an alias at a version, in MLflow's registry and in Carrara (503 if MLflow is down)."""
    client = registry_client(settings.mlflow_url)
    row, previous = service.set_alias(session, client, name, alias, body.version, principal)
    return AliasOut(model=name, alias=alias, version=row.version, previous_version=previous)


@router.delete("/{name}/aliases/{alias}", response_model=AliasOut)
def delete_alias(
    name: ModelName,
    alias: AliasName,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> AliasOut:
    """Remove an alias, from MLflow's registry and from Carrara (503 if MLflow is down)."""
    client = registry_client(settings.mlflow_url)
    version = service.delete_alias(session, client, name, alias, principal)
    return AliasOut(model=name, alias=alias, version=version, previous_version=version)


@router.post("/{name}/sync", response_model=SyncOut)
def sync_model(
    name: ModelName, session: SessionDep, principal: Editor, settings: SettingsDep
) -> SyncOut:
    """Reconcile from MLflow's registry: import missing versions, mirror its aliases."""
    result = service.sync_model(session, registry_client(settings.mlflow_url), name, principal)
    return views.sync_out(session, result)
