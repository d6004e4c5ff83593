from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status

from carrara.audit.service import record
from carrara.auth.dependencies import Editor, SessionDep, Viewer
from carrara.datasets import service
from carrara.datasets.schemas import (
    NAME_PATTERN,
    TOPIC_PATTERN,
    DatasetCreate,
    DatasetCreated,
    DatasetOut,
    DatasetUpdate,
    DatasetVersionOut,
    SnapshotCreate,
)
from carrara.models import DatasetVersion
from carrara.pagination import Page, PageParams, page_params
from carrara.settings import Settings, get_settings

router = APIRouter(prefix="/datasets", tags=["datasets"])

NamePath = Annotated[
    str, Path(min_length=1, max_length=100, pattern=NAME_PATTERN, description="Dataset name")
]
NumberPath = Annotated[int, Path(ge=1, le=2**31 - 1, description="Version number")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _version_out(version: DatasetVersion) -> DatasetVersionOut:
    return DatasetVersionOut(
        id=version.id,
        dataset=version.dataset.name,
        number=version.number,
        mode=version.mode,
        selector=version.selector,
        offsets=version.offsets,
        event_count=version.event_count,
        description=version.description,
        created_by=version.created_by,
        created_at=version.created_at,
    )


@router.post("", response_model=DatasetCreated, status_code=status.HTTP_201_CREATED)
def create_dataset(
    body: DatasetCreate, session: SessionDep, principal: Editor, settings: SettingsDep
) -> DatasetCreated:
    """Register a dataset; recent events of its topic must match the schema (422 names fields)."""
    created = service.create_dataset(session, settings.kafka_bootstrap, body, principal)
    dataset = created.dataset
    record(
        session,
        principal,
        "dataset.create",
        "dataset",
        dataset.name,
        after=service.as_audit(dataset),
        detail=(
            f"topic created with {body.create_topic.partitions} partitions"
            if body.create_topic
            else f"schema checked against {created.sample_size} recent events"
        ),
    )
    return DatasetCreated(
        **DatasetOut.model_validate(dataset).model_dump(),
        topic_created=created.topic_created,
        sample_size=created.sample_size,
    )


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
    name_prefix: Annotated[
        str | None, Query(max_length=100, pattern=r"^[a-z0-9._-]*$", description="Name prefix")
    ] = None,
    topic: Annotated[
        str | None, Query(max_length=249, pattern=TOPIC_PATTERN, description="Kafka topic")
    ] = None,
) -> Page[DatasetOut]:
    """Datasets, newest first; filter by name prefix or topic."""
    items, cursor = service.list_datasets(session, params, name_prefix=name_prefix, topic=topic)
    return Page(items=[DatasetOut.model_validate(i) for i in items], next_cursor=cursor)


@router.get("/{name}", response_model=DatasetOut)
def get_dataset(name: NamePath, session: SessionDep, _: Viewer) -> DatasetOut:
    """One dataset: topic, key, event time, features, label and task."""
    return DatasetOut.model_validate(service.get_dataset(session, name))


@router.patch("/{name}", response_model=DatasetOut)
def update_dataset(
    name: NamePath, body: DatasetUpdate, session: SessionDep, principal: Editor
) -> DatasetOut:
    """Change a dataset's description or owner (its schema and topic are fixed)."""
    dataset, before = service.update_dataset(
        session, name, description=body.description, owner=body.owner
    )
    record(
        session,
        principal,
        "dataset.update",
        "dataset",
        dataset.name,
        before=before,
        after={"description": dataset.description, "owner": dataset.owner},
    )
    return DatasetOut.model_validate(dataset)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(name: NamePath, session: SessionDep, principal: Editor) -> Response:
    """Delete a dataset and its versions (the Kafka topic stays); 409 while a run uses it."""
    before = service.delete_dataset(session, name)
    record(session, principal, "dataset.delete", "dataset", name, before=before)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{name}/versions", response_model=DatasetVersionOut, status_code=status.HTTP_201_CREATED
)
def create_version(
    name: NamePath,
    body: SnapshotCreate,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> DatasetVersionOut:
    """Pin the topic's offsets (latest, a time range or explicit) as the next immutable version."""
    version = service.create_version(session, settings.kafka_bootstrap, name, body, principal)
    record(
        session,
        principal,
        "dataset.version.create",
        "dataset_version",
        f"{name}/v{version.number}",
        after={
            "dataset": name,
            "number": version.number,
            "mode": version.mode,
            "selector": version.selector,
            "offsets": version.offsets,
            "event_count": version.event_count,
        },
    )
    return _version_out(version)


@router.get("/{name}/versions", response_model=Page[DatasetVersionOut])
def list_versions(
    name: NamePath,
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
) -> Page[DatasetVersionOut]:
    """A dataset's versions, newest first."""
    items, cursor = service.list_versions(session, name, params)
    return Page(items=[_version_out(v) for v in items], next_cursor=cursor)


@router.get("/{name}/versions/{number}", response_model=DatasetVersionOut)
def get_version(
    name: NamePath, number: NumberPath, session: SessionDep, _: Viewer
) -> DatasetVersionOut:
    """One version: its per-partition `[start, end)` offsets and event count."""
    return _version_out(service.get_version(session, name, number))
