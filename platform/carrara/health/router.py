"""`/healthz` (the process is up) and `/readyz` (every dependency answers)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from carrara.health.service import check_readiness
from carrara.settings import Settings, get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the API process is up and serving."""
    return {"status": "ok"}


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
