"""`/healthz` (the process is up) and `/readyz` (every dependency answers)."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from carrara.auth.cache import TokenCache
from carrara.auth.service import authenticate
from carrara.deps import SessionDep, token_cache
from carrara.errors import Unauthorized
from carrara.health.service import ReadinessCache, loop_reports
from carrara.settings import Settings, get_settings

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "A background loop is wedged"}})
def healthz(request: Request) -> JSONResponse:
    """Liveness: the API process is up and serving, and its background loops turn.

    One API process at a time (elected through a Postgres advisory lock: `leader-election`)
    runs the single-run loops, listed in `single_run` with this process's `pid`. Each loop
    (election, outbox relay, scorer-status consumer) is reported: `stalled` when it has had
    work it could not complete for the stall timeout (Kafka or Redis away: visible here and in
    the logs, but not fatal, since restarting the API cannot bring Kafka back and would take the
    UI away while operators need it); `wedged` when the loop itself stopped turning (stuck in a
    call): that fails liveness, so the orchestrator restarts the process.
    """
    state = request.app.state
    loops = loop_reports(getattr(state, "loops", {}))
    wedged = [name for name, report in loops.items() if report["wedged"]]
    body = {
        "status": "ok" if not wedged else "wedged",
        "wedged": wedged,
        "loops": loops,
        # The single-run loops this process runs (one API process at a time is elected).
        "single_run": list(getattr(state, "single_run", [])),
        "pid": os.getpid(),
    }
    return JSONResponse(body, status_code=503 if wedged else 200)


@router.get("/readyz", responses={503: {"description": "A dependency is not reachable"}})
async def readyz(
    request: Request,
    session: SessionDep,
    settings: Settings = Depends(get_settings),  # noqa: B008
) -> JSONResponse:
    """Readiness: Postgres, Kafka, Redis and MLflow all answer; 503 names the ones that do not.

    The checks run at most once per `CARRARA_READYZ_CACHE_S` seconds. What each dependency said
    (`checks`) is shown only to a caller with a valid API token (any role).
    """
    cache = getattr(request.app.state, "readiness", None)
    if cache is None:
        cache = request.app.state.readiness = ReadinessCache()
    results, age = await cache.results(settings)
    failing = [r.name for r in results if not r.ok]
    body: dict[str, object] = {
        "status": "ready" if not failing else "not ready",
        "failing": failing,
    }
    # Read by hand, not through the `bearer` dependency: the endpoint needs no token (probes
    # call it without one), and OpenAPI must not say it does.
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if (
        scheme.lower() == "bearer"
        and token
        and await asyncio.to_thread(_valid_token, session, token.strip(), token_cache(request))
    ):
        body["checks"] = {r.name: {"ok": r.ok, "detail": r.detail} for r in results}
        body["age_s"] = round(age, 3)
    return JSONResponse(body, status_code=503 if failing else 200)


def _valid_token(session: Session, secret: str, cache: TokenCache | None) -> bool:
    """Whether `secret` is a valid API token (False too when the database does not answer)."""
    try:
        authenticate(session, secret, cache)
    except Unauthorized:
        return False
    except SQLAlchemyError:
        session.rollback()
        return False
    return True
