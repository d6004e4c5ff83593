"""Deployments: the list, and one deployment's variants, revision history, rollout across scorers,
live per-variant charts, the A/B verdict and drift. Editing and rolling back: `deployment_edit`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Query, Request, Response

from carrara.deployments import service as deployments
from carrara.deps import DeploymentName, MonitoringCache, SettingsDep
from carrara.errors import DomainError
from carrara.monitoring import service as monitoring
from carrara.monitoring.schemas import AlertOut, DriftOut
from carrara.ui import charts
from carrara.ui.forms import text
from carrara.ui.pages import list_page, page_router, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer
from carrara.ui.templating import flash, render

router = page_router()
REVISIONS_SHOWN = 20
MAX_REASON = 500  # as the API's `reason`
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
    # A stopped deployment shows the topics and variants it ran last.
    last = {d.name: deployments.last_spec(session, d.name) for d in page.items if d.spec is None}
    context = {
        "nav": "deployments",
        "page": page,
        "status": status_ or "",
        "cursor": cursor,
        "last": last,
    }
    return render(request, "deployments/list.html", context)


# --- one deployment, and its live panels ------------------------------------------------------


@router.post("/deployments/{name}/stop")
def stop(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Stop the deployment, as `DELETE /api/v1/deployments/{name}` does (a new revision)."""
    reason = text(form, "reason")
    if len(reason) > MAX_REASON:
        flash(request, "error", f"The reason is too long: at most {MAX_REASON} characters.")
        return redirect(f"/deployments/{name}")
    try:
        applied = deployments.stop(session, name, reason, user, deployments.publishing(settings))
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
    else:
        flash(
            request,
            "success",
            f"Stopped: revision {applied.revision.number} tells the scorers to stop it.",
        )
    return redirect(f"/deployments/{name}")


@router.post("/deployments/{name}/restart")
def restart(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Start a stopped deployment again with the spec it ran last (a new revision)."""
    reason = text(form, "reason")
    if len(reason) > MAX_REASON:
        flash(request, "error", f"The reason is too long: at most {MAX_REASON} characters.")
        return redirect(f"/deployments/{name}")
    try:
        applied = deployments.restart(session, name, reason, user, deployments.publishing(settings))
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
    else:
        flash(
            request,
            "success",
            f"Started: revision {applied.revision.number} runs the spec it ran before it stopped.",
        )
    return redirect(f"/deployments/{name}")


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
    last = deployments.last_spec(session, name) if detail.spec is None else None
    spec = detail.spec or (last[1] if last else None)
    context = {
        "nav": "deployments",
        "deployment": detail,
        "last": last,
        "pool_known": spec is None or spec.pool in deployments.known_pools(session),
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
    monitoring_cache: MonitoringCache,
    window: Window = charts.DEFAULT_WINDOW,
) -> Response:
    """Per-variant totals and chart series of the window (polled by the live panel)."""
    _, seconds, bucket = charts.WINDOWS[window]
    metrics = monitoring.metrics_view(
        session, name, None, None, bucket, monitoring_cache, default=timedelta(seconds=seconds)
    )
    end = metrics.end
    _, current = deployments.get_deployment(session, name)
    champion = deployments.champion_of(current.spec) if current.spec else None
    context = {
        "metrics": metrics,
        "chart": charts.chart_data(metrics, champion),
        "window": window,
        "updated_at": end,
        "total": charts.total_predictions(metrics),
    }
    return render(request, "partials/deployment_live.html", context)


@router.get("/deployments/{name}/verdict")
def verdict(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    monitoring_cache: MonitoringCache,
) -> Response:
    """The A/B verdict of every challenger against the champion (polled)."""
    result = monitoring.verdict_view(session, name, monitoring_cache)
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
