"""FastAPI dependencies: the calling principal, and role requirements per route."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from carrara.auth.roles import Role
from carrara.auth.service import Principal, authenticate
from carrara.db import get_session
from carrara.errors import Forbidden, Unauthorized

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer crr_…`")

# scope="function": the session commits before the response is sent, so a client that got a 201
# can read what it created, and a failing commit is an error response rather than a lost write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def current_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("an API token is required: send `Authorization: Bearer <token>`")
    return authenticate(session, credentials.credentials)


def require(role: Role) -> Callable[[Principal], Principal]:
    """Dependency factory: the principal, if its role is at least `role`; 403 otherwise."""

    def _check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.can(role):
            raise Forbidden(
                f"this needs the {role.value} role; "
                f"token '{principal.name}' has the {principal.role.value} role"
            )
        return principal

    return _check


Viewer = Annotated[Principal, Depends(require(Role.viewer))]
Editor = Annotated[Principal, Depends(require(Role.editor))]
Admin = Annotated[Principal, Depends(require(Role.admin))]
