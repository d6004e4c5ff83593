"""The overview: what runs right now (deployments, throughput, verdicts), recent runs, alerts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Request, Response
from sqlalchemy.orm import Session

from carrara.auth.service import Principal
from carrara.deployments import router as deployments_api
from carrara.deployments.schemas import DeploymentOut
from carrara.errors import DomainError
from carrara.monitoring import router as monitoring_api
from carrara.monitoring.schemas import AlertOut
from carrara.training import router as training_api
from carrara.ui.charts import total_predictions
from carrara.ui.pages import list_page, page_router
from carrara.ui.security import PageSession, PageViewer
from carrara.ui.templating import render

router = page_router()
THROUGHPUT_WINDOW = timedelta(minutes=5)
LIVE_DEPLOYMENTS = 20


@dataclass
class LiveDeployment:
    """A running deployment's line on the overview."""

    deployment: DeploymentOut
    per_minute: float | None  # live events scored per minute over the last 5 minutes
    verdict: str
    significant: bool
    problem: str = ""


def live_deployments(session: Session, user: Principal) -> list[LiveDeployment]:
    """Running deployments with their recent throughput and A/B verdict."""
    page = deployments_api.list_deployments(
        session, user, list_page(None, LIVE_DEPLOYMENTS), status_="running"
    )
    end = datetime.now(UTC)
    lines = []
    for deployment in page.items:
        line = LiveDeployment(deployment, None, "", significant=False)
        try:
            metrics = monitoring_api.get_metrics(
                deployment.name, session, user, end - THROUGHPUT_WINDOW, end, "minute"
            )
            line.per_minute = total_predictions(metrics) / (THROUGHPUT_WINDOW.seconds / 60)
            verdict = monitoring_api.get_verdict(deployment.name, session, user)
            if verdict.comparisons:
                line.verdict = "; ".join(c.verdict for c in verdict.comparisons)
                line.significant = any(c.significant for c in verdict.comparisons)
            else:
                line.verdict = "one live variant: nothing to compare"
        except DomainError as exc:
            line.problem = exc.detail
        lines.append(line)
    return lines


def recent_alerts(session: Session, user: Principal, limit: int = 8) -> list[AlertOut]:
    return monitoring_api.list_alerts(session, user, list_page(None, limit)).items


@router.get("/")
def overview(request: Request, session: PageSession, user: PageViewer) -> Response:
    """Live deployments, recent runs and alerts."""
    runs = training_api.list_runs(session, user, list_page(None, 8)).items
    context = {
        "nav": "overview",
        "deployments": live_deployments(session, user),
        "runs": runs,
        "alerts": recent_alerts(session, user),
    }
    return render(request, "overview.html", context)


@router.get("/overview/live")
def overview_live(request: Request, session: PageSession, user: PageViewer) -> Response:
    """The live deployments table (polled by the overview page)."""
    context = {"deployments": live_deployments(session, user)}
    return render(request, "partials/overview_deployments.html", context)
