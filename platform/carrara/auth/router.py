"""`/api/v1/tokens`: create, list and revoke API tokens (adapters over `auth.service`)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, status

from carrara.auth import service
from carrara.auth.schemas import TokenCreate, TokenCreated, TokenOut, TokenRotate, WhoAmI
from carrara.deps import Admin, DbId, PageParamsDep, SessionDep, Viewer
from carrara.pagination import Page

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.get("/me", response_model=WhoAmI)
def whoami(principal: Viewer) -> WhoAmI:
    """The token making this call: its name and role."""
    return WhoAmI(token_id=principal.token_id, name=principal.name, role=principal.role)


@router.post("", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, session: SessionDep, principal: Admin) -> TokenCreated:
    """Create an API token (expiring after `expires_in` seconds, if given). The secret is in
    this response only; it is stored hashed."""
    expires_in = timedelta(seconds=body.expires_in) if body.expires_in else None
    row, secret = service.create_token(session, body.name, body.role, principal, expires_in)
    session.flush()
    session.refresh(row)
    return TokenCreated(**TokenOut.model_validate(row).model_dump(), token=secret)


@router.post("/{token_id}/rotate", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def rotate_token(
    token_id: DbId, body: TokenRotate, session: SessionDep, principal: Viewer
) -> TokenCreated:
    """Replace a token by a new one (same name and role) and revoke the old one at once.

    Admins rotate any token; any token may rotate itself. The new secret is in this response only.
    """
    expires_in = timedelta(seconds=body.expires_in) if body.expires_in else None
    row, secret = service.rotate_token(session, token_id, principal, expires_in)
    session.flush()
    session.refresh(row)
    return TokenCreated(**TokenOut.model_validate(row).model_dump(), token=secret)


@router.get("", response_model=Page[TokenOut])
def list_tokens(session: SessionDep, _: Admin, params: PageParamsDep) -> Page[TokenOut]:
    """All tokens (never their secrets), newest first."""
    items, cursor = service.list_tokens(session, params)
    return Page(items=[TokenOut.model_validate(i) for i in items], next_cursor=cursor)


@router.delete("/{token_id}", response_model=TokenOut)
def revoke_token(token_id: DbId, session: SessionDep, principal: Admin) -> TokenOut:
    """Revoke a token: it stops working at once. A token cannot revoke itself."""
    return TokenOut.model_validate(service.revoke_token(session, token_id, principal))
