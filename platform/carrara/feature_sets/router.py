"""`/api/v1/datasets/{name}/features`: adapters over `feature_sets.service` (which audits)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Response, status

from carrara.deps import DatasetName, Editor, SessionDep, SettingsDep, Viewer
from carrara.feature_sets import service
from carrara.feature_sets.schemas import (
    FeatureOutput,
    FeaturePreviewIn,
    FeaturePreviewOut,
    FeaturePreviewRow,
    FeatureSetOut,
    FeatureSetPut,
    FeatureSetRevisionOut,
)

router = APIRouter(prefix="/datasets", tags=["feature sets"])


def _feature_set(session: SessionDep, name: str) -> FeatureSetOut:
    dataset = service.get_dataset(session, name)
    revisions = [
        FeatureSetRevisionOut.model_validate(r) for r in service.list_revisions(session, dataset)
    ]
    return FeatureSetOut(
        dataset=name, current=revisions[0] if revisions else None, revisions=revisions
    )


@router.put("/{name}/features", response_model=FeatureSetOut)
def put_features(
    name: DatasetName,
    body: FeatureSetPut,
    session: SessionDep,
    principal: Editor,
    response: Response,
) -> FeatureSetOut:
    """Store the SQL as the dataset's next feature-set revision (422: the parser's message).

    An unchanged definition (same SQL and late policy) stores nothing and answers 200; a new
    revision answers 201.
    """
    applied = service.put_feature_set(session, name, body, principal)
    response.status_code = status.HTTP_201_CREATED if applied.changed else status.HTTP_200_OK
    session.flush()
    return _feature_set(session, name)


@router.get("/{name}/features", response_model=FeatureSetOut)
def get_features(name: DatasetName, session: SessionDep, _: Viewer) -> FeatureSetOut:
    """The dataset's current feature-set revision and every revision, newest first."""
    return _feature_set(session, name)


@router.post("/{name}/features/preview", response_model=FeaturePreviewOut)
def preview_features(
    name: DatasetName,
    body: FeaturePreviewIn,
    session: SessionDep,
    _: Viewer,
    settings: SettingsDep,
) -> FeaturePreviewOut:
    """The features of the topic's newest N events (the current revision, or SQL given here)."""
    result = service.preview(session, settings.kafka_bootstrap, name, body)
    return FeaturePreviewOut(
        dataset=name,
        revision=result.revision,
        columns=[FeatureOutput(**o) for o in result.plan.describe()],
        rows=[FeaturePreviewRow(**asdict(r)) for r in result.rows],
        note=service.PREVIEW_NOTE,
    )
