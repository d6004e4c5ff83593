"""`/api/v1/datasets`: adapters over `datasets.service` (which validates and audits)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from carrara.datasets import service
from carrara.datasets.schemas import (
    TOPIC_PATTERN,
    DatasetCreate,
    DatasetCreated,
    DatasetOut,
    DatasetUpdate,
    DatasetVersionOut,
    SnapshotCreate,
)
from carrara.deps import (
    DatasetName,
    DatasetVersionNumber,
    Editor,
    PageParamsDep,
    SessionDep,
    SettingsDep,
    Viewer,
)
from carrara.pagination import Page
from carrara.topic_policy import TopicPolicy

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.post("", response_model=DatasetCreated, status_code=status.HTTP_201_CREATED)
def create_dataset(
    body: DatasetCreate, session: SessionDep, principal: Editor, settings: SettingsDep
) -> DatasetCreated:
    """Register a dataset; recent events of its topic must match the schema (422 names fields)."""
    created = service.create_dataset(
        session, settings.kafka_bootstrap, body, principal, TopicPolicy.from_settings(settings)
    )
    return DatasetCreated(
        **DatasetOut.model_validate(created.dataset).model_dump(),
        topic_created=created.topic_created,
        sample_size=created.sample_size,
        subject_version=created.subject_version,
    )


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    session: SessionDep,
    _: Viewer,
    params: PageParamsDep,
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
def get_dataset(name: DatasetName, session: SessionDep, _: Viewer) -> DatasetOut:
    """One dataset: topic, key, event time, features, label and task."""
    return DatasetOut.model_validate(service.get_dataset(session, name))


@router.patch("/{name}", response_model=DatasetOut)
def update_dataset(
    name: DatasetName, body: DatasetUpdate, session: SessionDep, principal: Editor
) -> DatasetOut:
    """Change a dataset's description or owner (its schema and topic are fixed)."""
    dataset = service.update_dataset(
        session, name, principal, description=body.description, owner=body.owner
    )
    return DatasetOut.model_validate(dataset)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(name: DatasetName, session: SessionDep, principal: Editor) -> Response:
    """Delete a dataset and its versions (the Kafka topic stays); 409 while a run uses it."""
    service.delete_dataset(session, name, principal)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{name}/versions", response_model=DatasetVersionOut, status_code=status.HTTP_201_CREATED
)
def create_version(
    name: DatasetName,
    body: SnapshotCreate,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> DatasetVersionOut:
    """Pin the topic's offsets (latest, a time range or explicit) as the next immutable version."""
    version = service.create_version(session, settings.kafka_bootstrap, name, body, principal)
    return DatasetVersionOut.from_version(version)


@router.get("/{name}/versions", response_model=Page[DatasetVersionOut])
def list_versions(
    name: DatasetName, session: SessionDep, _: Viewer, params: PageParamsDep
) -> Page[DatasetVersionOut]:
    """A dataset's versions, newest first."""
    items, cursor = service.list_versions(session, name, params)
    return Page(items=[DatasetVersionOut.from_version(v) for v in items], next_cursor=cursor)


@router.get("/{name}/versions/{number}", response_model=DatasetVersionOut)
def get_version(
    name: DatasetName, number: DatasetVersionNumber, session: SessionDep, _: Viewer
) -> DatasetVersionOut:
    """One version: its per-partition `[start, end)` offsets and event count."""
    return DatasetVersionOut.from_version(service.get_version(session, name, number))
