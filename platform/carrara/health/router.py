"""`/healthz` (the process is up) and `/readyz` (every dependency answers)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from carrara.health.service import check_readiness, loop_reports
from carrara.settings import Settings, get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "A background loop is wedged"}})
def healthz(request: Request) -> JSONResponse:
    """Liveness: the API process is up and serving, and its background loops turn.

    Each Kafka loop (outbox relay, scorer-status consumer) is reported: `stalled` when it has had
    work it could not complete for the stall timeout (Kafka or Redis away: visible here and in
    the logs, but not fatal, since restarting the API cannot bring Kafka back and would take the
    UI away while operators need it); `wedged` when the loop itself stopped turning (stuck in a
    call): that fails liveness, so the orchestrator restarts the process.
    """
    loops = loop_reports(getattr(request.app.state, "loops", {}))
    wedged = [name for name, report in loops.items() if report["wedged"]]
    body = {"status": "ok" if not wedged else "wedged", "wedged": wedged, "loops": loops}
    return JSONResponse(body, status_code=503 if wedged else 200)


@router.get("/readyz", responses={503: {"description": "A dependency is not reachable"}})
async def readyz(settings: Settings = Depends(get_settings)) -> JSONResponse:  # noqa: B008
    """Readiness: Postgres, Kafka, Redis and MLflow all answer; 503 names the ones that do not."""
    results = await check_readiness(settings)
    failing = [r.name for r in results if not r.ok]
    body = {
        "status": "ready" if not failing else "not ready",
        "failing": failing,
        "checks": {r.name: {"ok": r.ok, "detail": r.detail} for r in results},
    }
    return JSONResponse(body, status_code=503 if failing else 200)
