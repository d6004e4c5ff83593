"""`/api/v1/runs`: adapters over `training.service` (which queues, transitions and audits)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi import status as http_status

from carrara.deps import Editor, PageParamsDep, RunId, SessionDep, Viewer
from carrara.pagination import Page
from carrara.training import service
from carrara.training.schemas import (
    DATASET_NAME_PATTERN,
    MODEL_NAME_PATTERN,
    AlgorithmOut,
    RunCreate,
    RunOut,
    RunStatus,
)

router = APIRouter(prefix="/runs", tags=["runs"])


@router.get("/algorithms", response_model=list[AlgorithmOut])
def list_algorithms(_: Viewer) -> list[AlgorithmOut]:
    """The algorithms runs can use: the tasks each supports and the JSON schema of its params."""
    return service.algorithms()


@router.post(
    "",
    response_model=RunOut,
    status_code=http_status.HTTP_201_CREATED,
    responses={
        200: {"model": RunOut, "description": "The run this Idempotency-Key already started."},
    },
)
def start_run(
    body: RunCreate,
    session: SessionDep,
    principal: Editor,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            pattern=r"^[\x20-\x7e]+$",
            description="Printable ASCII. Retrying with the same key returns the run it "
            "started instead of starting another one (409 if the body differs).",
        ),
    ] = None,
) -> RunOut:
    """Queue a training run of a dataset version; its task is sent once the run is committed."""
    run, created = service.create_run(
        session,
        principal,
        dataset=body.dataset,
        dataset_version=body.dataset_version,
        algorithm=body.algorithm,
        params=body.params,
        holdout=body.holdout.model_dump(mode="json"),
        registered_model_name=body.registered_model_name,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = http_status.HTTP_200_OK
    return RunOut.from_run(run)


@router.get("", response_model=Page[RunOut])
def list_runs(
    session: SessionDep,
    _: Viewer,
    params: PageParamsDep,
    status: RunStatus | None = None,
    dataset: Annotated[str | None, Query(pattern=DATASET_NAME_PATTERN)] = None,
    algorithm: Annotated[str | None, Query(pattern=r"^[a-z0-9_]{1,50}$")] = None,
    registered_model_name: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN)] = None,
) -> Page[RunOut]:
    """Training runs, newest first; filter by status, dataset, algorithm and model name."""
    items, cursor = service.list_runs(
        session,
        params,
        status=status.value if status else None,
        dataset=dataset,
        algorithm=algorithm,
        registered_model_name=registered_model_name,
    )
    return Page(items=[RunOut.from_run(r) for r in items], next_cursor=cursor)


@router.get("/{run_id}", response_model=RunOut)
def get_run(run_id: RunId, session: SessionDep, _: Viewer) -> RunOut:
    """One run: state, progress, metrics, error, MLflow run and the model version it produced."""
    return RunOut.from_run(service.get_run(session, run_id))


@router.post("/{run_id}/cancel", response_model=RunOut)
def cancel_run(run_id: RunId, session: SessionDep, principal: Editor) -> RunOut:
    """Cancel a queued or running run (409 if it already finished)."""
    return RunOut.from_run(service.cancel_run(session, principal, run_id))
