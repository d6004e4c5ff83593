from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from sqlalchemy.orm import Session

from carrara.audit.service import record
from carrara.auth.dependencies import Editor, SessionDep, Viewer
from carrara.models import ModelVersion, RegisteredModel, TrainingRun
from carrara.pagination import Page, PageParams, page_params
from carrara.registry import service
from carrara.registry.mlflow_sync import registry_client
from carrara.registry.schemas import (
    AliasName,
    AliasOut,
    DatasetLineage,
    ModelName,
    ModelOut,
    ModelSummary,
    RunLineage,
    SyncOut,
    VersionNumber,
    VersionOut,
    VersionRef,
)
from carrara.settings import Settings, get_settings

router = APIRouter(prefix="/models", tags=["models"])
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _run_lineage(run: TrainingRun | None) -> RunLineage | None:
    if run is None:
        return None
    snapshot = run.dataset_version
    return RunLineage(
        id=run.id,
        status=run.status,
        algorithm=run.algorithm,
        params=run.params,
        mlflow_run_id=run.mlflow_run_id,
        mlflow_url=run.mlflow_url,
        dataset=DatasetLineage(
            dataset=snapshot.dataset.name,
            version=snapshot.number,
            topic=snapshot.dataset.topic,
            offsets=snapshot.offsets,
            event_count=snapshot.event_count,
        ),
    )


def _version_out(
    model: RegisteredModel, row: ModelVersion, runs: dict[int, TrainingRun]
) -> VersionOut:
    return VersionOut(
        model=model.name,
        version=row.version,
        mlflow_source=row.mlflow_source,
        metrics=row.metrics,
        aliases=service.aliases_by_version(model).get(row.version, []),
        run=_run_lineage(runs.get(row.run_id) if row.run_id else None),
        created_at=row.created_at,
    )


def _model_out(session: Session, model: RegisteredModel) -> ModelOut:
    runs = service.load_lineage(session, [v.run_id for v in model.versions if v.run_id])
    return ModelOut(
        name=model.name,
        description=model.description,
        aliases={a.alias: a.model_version.version for a in model.aliases},
        versions=[_version_out(model, v, runs) for v in reversed(model.versions)],
        created_at=model.created_at,
    )


@router.get("", response_model=Page[ModelSummary])
def list_models(
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
    name: Annotated[
        str | None, Query(max_length=200, description="Only models whose name starts with this")
    ] = None,
) -> Page[ModelSummary]:
    """Registered models, newest first, with their latest version and aliases."""
    items, cursor = service.list_models(session, params, name)
    return Page(
        items=[
            ModelSummary(
                name=m.name,
                description=m.description,
                latest_version=m.versions[-1].version if m.versions else None,
                version_count=len(m.versions),
                aliases={a.alias: a.model_version.version for a in m.aliases},
                created_at=m.created_at,
            )
            for m in items
        ],
        next_cursor=cursor,
    )


@router.get("/{name}", response_model=ModelOut)
def get_model(name: ModelName, session: SessionDep, _: Viewer) -> ModelOut:
    """A registered model: versions (newest first) with lineage and metrics, and its aliases."""
    return _model_out(session, service.get_model(session, name))


@router.get("/{name}/versions/{version}", response_model=VersionOut)
def get_version(
    name: ModelName, version: VersionNumber, session: SessionDep, _: Viewer
) -> VersionOut:
    """One version: lineage (run -> dataset snapshot and offsets), metrics, aliases."""
    row = service.get_version(session, name, version)
    model = service.get_model(session, name)
    runs = service.load_lineage(session, [row.run_id] if row.run_id else [])
    return _version_out(model, row, runs)


@router.post("/{name}/versions", response_model=VersionOut, status_code=status.HTTP_201_CREATED)
def import_version(
    name: ModelName,
    body: VersionRef,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> VersionOut:
    """Import an existing MLflow registry version (a model trained outside Carrara)."""
    row = service.import_version(session, registry_client(settings.mlflow_url), name, body.version)
    model = service.get_model(session, name)
    runs = service.load_lineage(session, [row.run_id] if row.run_id else [])
    out = _version_out(model, row, runs)
    record(
        session,
        principal,
        "model.version.import",
        "model",
        name,
        after={"version": row.version, "mlflow_source": row.mlflow_source},
    )
    return out


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
    row, previous = service.set_alias(
        session, registry_client(settings.mlflow_url), name, alias, body.version
    )
    record(
        session,
        principal,
        "model.alias.set",
        "model",
        name,
        before={"alias": alias, "version": previous} if previous is not None else None,
        after={"alias": alias, "version": row.version},
    )
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
    version = service.delete_alias(session, registry_client(settings.mlflow_url), name, alias)
    record(
        session,
        principal,
        "model.alias.delete",
        "model",
        name,
        before={"alias": alias, "version": version},
    )
    return AliasOut(model=name, alias=alias, version=version, previous_version=version)


@router.post("/{name}/sync", response_model=SyncOut)
def sync_model(
    name: ModelName, session: SessionDep, principal: Editor, settings: SettingsDep
) -> SyncOut:
    """Reconcile from MLflow's registry: import missing versions, mirror its aliases."""
    result = service.sync_model(session, registry_client(settings.mlflow_url), name)
    record(
        session,
        principal,
        "model.sync",
        "model",
        name,
        after={
            "imported_versions": result.imported_versions,
            "aliases_set": result.aliases_set,
            "aliases_removed": result.aliases_removed,
        },
    )
    return SyncOut(
        model=_model_out(session, result.model),
        imported_versions=result.imported_versions,
        aliases_set=result.aliases_set,
        aliases_removed=result.aliases_removed,
        aliases_skipped=result.aliases_skipped,
    )
