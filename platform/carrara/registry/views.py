"""Registered models as the API and the UI show them: versions with lineage, aliases, summaries.

The read side of the registry service: loads what a view needs in a fixed number of queries
and shapes it with the API's schemas, so the REST routers and the UI pages show the same thing.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from carrara.models import ModelVersion, RegisteredModel, TrainingRun
from carrara.pagination import Page, PageParams
from carrara.registry import service
from carrara.registry.schemas import (
    DatasetLineage,
    ModelOut,
    ModelSummary,
    RunLineage,
    SyncOut,
    VersionOut,
)


def run_lineage(run: TrainingRun | None) -> RunLineage | None:
    """The run that trained a version, with the dataset snapshot (and offsets) it read."""
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


def version_out(
    model: RegisteredModel, row: ModelVersion, runs: dict[int, TrainingRun]
) -> VersionOut:
    """Version `row` of `model` with its aliases and lineage (`runs` from `load_lineage`)."""
    return VersionOut(
        model=model.name,
        version=row.version,
        mlflow_source=row.mlflow_source,
        metrics=row.metrics,
        aliases=service.aliases_by_version(model).get(row.version, []),
        run=run_lineage(runs.get(row.run_id) if row.run_id else None),
        origin=row.origin,
        trusted_code=row.trusted_code,
        artifact_digests=row.artifact_digests,
        created_at=row.created_at,
    )


def model_out(session: Session, model: RegisteredModel) -> ModelOut:
    """A model loaded by `service.get_model`: versions newest first with lineage, aliases."""
    runs = service.load_lineage(session, [v.run_id for v in model.versions if v.run_id])
    return ModelOut(
        name=model.name,
        description=model.description,
        aliases={a.alias: a.model_version.version for a in model.aliases},
        versions=[version_out(model, v, runs) for v in reversed(model.versions)],
        created_at=model.created_at,
    )


def model_summary(model: RegisteredModel) -> ModelSummary:
    return ModelSummary(
        name=model.name,
        description=model.description,
        latest_version=model.versions[-1].version if model.versions else None,
        version_count=len(model.versions),
        aliases={a.alias: a.model_version.version for a in model.aliases},
        created_at=model.created_at,
    )


def model_summaries(
    session: Session, params: PageParams, name_prefix: str | None = None
) -> Page[ModelSummary]:
    """A page of registered models, newest first, with their latest version and aliases."""
    items, cursor = service.list_models(session, params, name_prefix)
    return Page(items=[model_summary(m) for m in items], next_cursor=cursor)


def model_detail(session: Session, name: str) -> ModelOut:
    """Model `name` with every version's lineage and metrics; NotFound if it is not registered."""
    return model_out(session, service.get_model(session, name))


def version_detail(session: Session, name: str, version: int) -> VersionOut:
    """Version `version` of model `name` with its lineage and aliases."""
    row = service.get_version(session, name, version)
    model = service.get_model(session, name)
    runs = service.load_lineage(session, [row.run_id] if row.run_id else [])
    return version_out(model, row, runs)


def sync_out(session: Session, result: service.SyncResult) -> SyncOut:
    return SyncOut(
        model=model_out(session, result.model),
        imported_versions=result.imported_versions,
        aliases_set=result.aliases_set,
        aliases_removed=result.aliases_removed,
        aliases_skipped=result.aliases_skipped,
    )
