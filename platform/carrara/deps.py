"""The FastAPI dependencies shared by the REST routers and the UI pages, in one place.

Layering (see docs/architecture.md): `*/router.py` (REST) and `ui/pages/*` (HTML) are adapters
over each domain's `service.py`; both take their database session, settings, caller and path
parameters from this module, and neither imports the other. Services never import this module
(nor FastAPI's request machinery): they take a `Session`, plain values and the acting `Principal`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from carrara.api_types import PG_INT_MAX, DbId
from carrara.auth.cache import TokenCache
from carrara.auth.principal import Principal
from carrara.auth.roles import Role
from carrara.auth.service import authenticate, authenticate_cached
from carrara.datasets.schemas import NAME_PATTERN as DATASET_NAME_PATTERN
from carrara.db import get_session
from carrara.deployments.schemas import NAME_PATTERN as DEPLOYMENT_NAME_PATTERN
from carrara.errors import Forbidden, Unauthorized
from carrara.monitoring.views import ViewCache
from carrara.pagination import PageParams, page_params
from carrara.registry.schemas import ALIAS_PATTERN, MAX_VERSION, MODEL_NAME_PATTERN
from carrara.settings import Settings, get_settings

__all__ = [
    "Admin",
    "AliasName",
    "DatasetName",
    "DatasetVersionNumber",
    "DbId",
    "DeploymentName",
    "Editor",
    "ModelName",
    "MonitoringCache",
    "PageParamsDep",
    "RunId",
    "SessionDep",
    "SettingsDep",
    "VersionNumber",
    "Viewer",
    "bearer",
    "check_role",
    "current_principal",
    "require",
    "token_cache",
]

# --- session, settings, pagination --------------------------------------------------------------

# scope="function": the session commits before the response is sent, so a client that got a 201
# can read what it created, and a failing commit is an error response rather than a lost write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
PageParamsDep = Annotated[PageParams, Depends(page_params)]


async def monitoring_cache(request: Request) -> ViewCache | None:
    """The app's memory of recent metrics and verdicts (`CARRARA_MONITORING_CACHE_S`), if any."""
    return getattr(request.app.state, "monitoring_cache", None)


MonitoringCache = Annotated[ViewCache | None, Depends(monitoring_cache)]

# --- the caller and its role ----------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer crr_…`")


def token_cache(request: Request) -> TokenCache | None:
    """The app's memory of recently verified tokens (`CARRARA_AUTH_CACHE_S`), if it has one."""
    return getattr(request.app.state, "token_cache", None)


async def current_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The principal behind the request's bearer token; 401 without a valid one.

    Answered from the token cache when the token was verified recently (no query, and no trip
    through the thread pool); otherwise looked up in a worker thread."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("an API token is required: send `Authorization: Bearer <token>`")
    cache = token_cache(request)
    cached = authenticate_cached(credentials.credentials, cache)
    if cached is not None:
        return cached
    return await run_in_threadpool(authenticate, session, credentials.credentials, cache)


def check_role(principal: Principal, role: Role) -> Principal:
    """`principal` if its role is at least `role`; Forbidden (403) naming both otherwise."""
    if not principal.can(role):
        raise Forbidden(
            f"this needs the {role.value} role; "
            f"token '{principal.name}' has the {principal.role.value} role"
        )
    return principal


def require(role: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency factory: the principal, if its role is at least `role`; 403 otherwise.

    Dependencies that only compute are `async def`: FastAPI runs a plain `def` dependency in its
    thread pool, a hop that costs more than the check."""

    async def _check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        return check_role(principal, role)

    return _check


Viewer = Annotated[Principal, Depends(require(Role.viewer))]
Editor = Annotated[Principal, Depends(require(Role.editor))]
Admin = Annotated[Principal, Depends(require(Role.admin))]

# --- path parameters ----------------------------------------------------------------------------

DatasetName = Annotated[
    str,
    Path(min_length=1, max_length=100, pattern=DATASET_NAME_PATTERN, description="Dataset name"),
]
DatasetVersionNumber = Annotated[int, Path(ge=1, le=PG_INT_MAX, description="Version number")]
RunId = Annotated[int, Path(ge=1, le=PG_INT_MAX, description="Run id.")]
ModelName = Annotated[
    str,
    Path(
        pattern=MODEL_NAME_PATTERN,
        max_length=200,
        description="Registered model name (as in MLflow's registry)",
    ),
]
AliasName = Annotated[
    str,
    Path(
        pattern=ALIAS_PATTERN,
        max_length=100,
        description="Alias, e.g. `champion`; not `latest` nor `v<digits>` (MLflow reserves those)",
    ),
]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_VERSION, description="Model version number")]
DeploymentName = Annotated[
    str,
    Path(pattern=DEPLOYMENT_NAME_PATTERN, max_length=100, description="Deployment name (a slug)"),
]
