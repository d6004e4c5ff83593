"""The overview: what runs right now (deployments, throughput, verdicts), recent runs, alerts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Request, Response
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.deployments.schemas import DeploymentOut
from carrara.deps import MonitoringCache
from carrara.errors import DomainError
from carrara.monitoring import service as monitoring
from carrara.monitoring.schemas import AlertOut
from carrara.monitoring.service import ViewCache
from carrara.training import service as training
from carrara.training.schemas import RunOut
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


def live_deployments(session: Session, cache: ViewCache | None) -> list[LiveDeployment]:
    """Running deployments with their recent throughput and A/B verdict (from `cache` when
    computed in the last few seconds)."""
    page = deployments.deployment_page(session, list_page(None, LIVE_DEPLOYMENTS), "running")
    end = datetime.now(UTC)
    # One query for every line's throughput (not each deployment's whole metrics report).
    scored = monitoring.live_predictions(
        session, [d.name for d in page.items], end - THROUGHPUT_WINDOW, end
    )
    verdicts = monitoring.verdict_views(session, [d.name for d in page.items], cache)
    lines = []
    for deployment in page.items:
        line = LiveDeployment(deployment, None, "", significant=False)
        minutes = THROUGHPUT_WINDOW.seconds / 60
        line.per_minute = scored.get(deployment.name, 0) / minutes
        verdict = verdicts[deployment.name]
        if isinstance(verdict, DomainError):
            line.problem = verdict.detail
        elif verdict.comparisons:
            line.verdict = "; ".join(c.verdict for c in verdict.comparisons)
            line.significant = any(c.significant for c in verdict.comparisons)
        else:
            line.verdict = "one live variant: nothing to compare"
        lines.append(line)
    return lines


def stopped_deployments(session: Session, limit: int = 5) -> list[str]:
    """Names of the most recently made stopped deployments (the overview mentions them)."""
    page = deployments.deployment_page(session, list_page(None, limit), "stopped")
    return [d.name for d in page.items]


def recent_alerts(session: Session, limit: int = 8) -> list[AlertOut]:
    items, _ = monitoring.list_alerts(session, list_page(None, limit))
    return [AlertOut.model_validate(a) for a in items]


@router.get("/")
def overview(
    request: Request, session: PageSession, user: PageViewer, monitoring_cache: MonitoringCache
) -> Response:
    """Live deployments, recent runs and alerts."""
    runs, _ = training.list_runs(session, list_page(None, 8))
    context = {
        "nav": "overview",
        "deployments": live_deployments(session, monitoring_cache),
        "stopped": stopped_deployments(session),
        "runs": [RunOut.from_run(r) for r in runs],
        "alerts": recent_alerts(session),
    }
    return render(request, "overview.html", context)


@router.get("/overview/live")
def overview_live(
    request: Request, session: PageSession, user: PageViewer, monitoring_cache: MonitoringCache
) -> Response:
    """The live deployments table (polled by the overview page)."""
    context = {
        "deployments": live_deployments(session, monitoring_cache),
        "stopped": stopped_deployments(session),
    }
    return render(request, "partials/overview_deployments.html", context)
