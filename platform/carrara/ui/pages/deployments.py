"""Deployments: the list, and one deployment's variants, revision history, rollout across scorers,
live per-variant charts, the A/B verdict and drift. Editing and rolling back: `deployment_edit`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Query, Request, Response

from carrara.deployments import service as deployments
from carrara.deps import DeploymentName
from carrara.monitoring import service as monitoring
from carrara.monitoring.schemas import AlertOut, DriftOut, MetricsOut, VerdictOut
from carrara.ui import charts
from carrara.ui.pages import list_page, page_router
from carrara.ui.security import PageSession, PageViewer
from carrara.ui.templating import render

router = page_router()
REVISIONS_SHOWN = 20
Window = Annotated[str, Query(pattern="^(" + "|".join(charts.WINDOWS) + ")$")]


@router.get("/deployments")
def list_deployments(
    request: Request,
    session: PageSession,
    user: PageViewer,
    status: Annotated[str | None, Query(pattern="^(running|stopped)?$")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Deployments, newest first, with their current revision's variants."""
    status_ = "running" if status == "running" else "stopped" if status == "stopped" else None
    page = deployments.deployment_page(session, list_page(cursor), status_)
    context = {"nav": "deployments", "page": page, "status": status_ or "", "cursor": cursor}
    return render(request, "deployments/list.html", context)


# --- one deployment, and its live panels ------------------------------------------------------


@router.get("/deployments/{name}")
def deployment_detail(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    window: Window = charts.DEFAULT_WINDOW,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Variants, rollout, live charts, verdict, drift, alerts and the revision history."""
    detail = deployments.deployment_detail(session, name)
    revisions = deployments.revision_page(session, name, list_page(cursor, REVISIONS_SHOWN))
    alerts, _ = monitoring.list_alerts(session, list_page(None, 10), deployment=name)
    context = {
        "nav": "deployments",
        "deployment": detail,
        "revisions": revisions,
        "alerts": [AlertOut.model_validate(a) for a in alerts],
        "window": window,
        "windows": charts.WINDOWS,
        "cursor": cursor,
    }
    return render(request, "deployments/detail.html", context)


def _window(window: str) -> tuple[datetime, datetime, str]:
    _, seconds, bucket = charts.WINDOWS[window]
    end = datetime.now(UTC)
    return end - timedelta(seconds=seconds), end, bucket


@router.get("/deployments/{name}/live")
def live_metrics(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    window: Window = charts.DEFAULT_WINDOW,
) -> Response:
    """Per-variant totals and chart series of the window (polled by the live panel)."""
    start, end, bucket = _window(window)
    start, end = monitoring.window(start, end)
    metrics = MetricsOut.model_validate(monitoring.metrics(session, name, start, end, bucket))
    context = {
        "metrics": metrics,
        "chart": charts.chart_data(metrics),
        "window": window,
        "updated_at": end,
        "total": charts.total_predictions(metrics),
    }
    return render(request, "partials/deployment_live.html", context)


@router.get("/deployments/{name}/verdict")
def verdict(
    name: DeploymentName, request: Request, session: PageSession, user: PageViewer
) -> Response:
    """The A/B verdict of every challenger against the champion (polled)."""
    result = VerdictOut.model_validate(monitoring.verdict(session, name))
    return render(request, "partials/deployment_verdict.html", {"verdict": result})


@router.get("/deployments/{name}/drift")
def drift(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    window: Window = charts.DEFAULT_WINDOW,
) -> Response:
    """Per-feature drift of live inputs against the champion's training profile (polled)."""
    start, end, _ = _window(window)
    start, end = monitoring.window(start, end)
    result = DriftOut.model_validate(monitoring.drift(session, name, start, end))
    return render(request, "partials/deployment_drift.html", {"drift": result, "window": window})


@router.get("/deployments/{name}/rollout")
def rollout(
    name: DeploymentName, request: Request, session: PageSession, user: PageViewer
) -> Response:
    """Which scorers serve which revision (polled)."""
    detail = deployments.deployment_detail(session, name)
    return render(request, "partials/deployment_rollout.html", {"deployment": detail})
