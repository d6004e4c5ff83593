from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from carrara.api_types import QueryDateTime
from carrara.deployments.schemas import NAME_PATTERN
from carrara.deps import DeploymentName, MonitoringCache, SessionDep, Viewer
from carrara.monitoring import service
from carrara.monitoring.schemas import AlertOut, Bucket, DriftOut, MetricsOut, VerdictOut
from carrara.pagination import Page, PageParams, page_params

router = APIRouter(prefix="/deployments", tags=["monitoring"])
alerts_router = APIRouter(prefix="/alerts", tags=["monitoring"])

From = Annotated[
    QueryDateTime | None,
    Query(alias="from", description="Window start, inclusive (default: `to` minus one hour)"),
]
To = Annotated[
    QueryDateTime | None, Query(alias="to", description="Window end, exclusive (default: now)")
]


@router.get("/{name}/metrics", response_model=MetricsOut)
def get_metrics(
    name: DeploymentName,
    session: SessionDep,
    _: Viewer,
    cache: MonitoringCache,
    start: From = None,
    end: To = None,
    bucket: Annotated[Bucket, Query(description="Bucket size of the series")] = "minute",
) -> MetricsOut:
    """Per-variant time series (events, dead letters, latency, scores, live metrics) and totals.

    Served for up to `CARRARA_MONITORING_CACHE_S` seconds (default 5) per process once computed."""
    return service.metrics_view(session, name, start, end, bucket, cache)


@router.get("/{name}/verdict", response_model=VerdictOut)
def get_verdict(
    name: DeploymentName, session: SessionDep, _: Viewer, cache: MonitoringCache
) -> VerdictOut:
    """Each challenger vs. the champion: always-valid interval, p-value and a plain verdict.

    Served for up to `CARRARA_MONITORING_CACHE_S` seconds (default 5) per process once computed."""
    return service.verdict_view(session, name, cache)


@router.get("/{name}/drift", response_model=DriftOut)
def get_drift(
    name: DeploymentName, session: SessionDep, _: Viewer, start: From = None, end: To = None
) -> DriftOut:
    """Per feature: PSI (and KS) of live inputs vs. the champion model's training profile."""
    return DriftOut.model_validate(service.drift(session, name, start, end))


@alerts_router.get("", response_model=Page[AlertOut])
def list_alerts(
    session: SessionDep,
    _: Viewer,
    params: Annotated[PageParams, Depends(page_params)],
    deployment: Annotated[
        str | None, Query(pattern=NAME_PATTERN, max_length=100, description="Only this deployment")
    ] = None,
    kind: Annotated[
        str | None, Query(max_length=50, description="Only this kind, e.g. `drift`")
    ] = None,
    since: Annotated[
        QueryDateTime | None, Query(description="Only alerts raised at or after")
    ] = None,
) -> Page[AlertOut]:
    """Alerts raised by the monitor (drift, automatic promotion/rollback), newest first."""
    items, cursor = service.list_alerts(
        session, params, deployment=deployment, kind=kind, since=since
    )
    return Page(items=[AlertOut.model_validate(a) for a in items], next_cursor=cursor)
