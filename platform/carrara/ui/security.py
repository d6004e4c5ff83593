"""Who is signed in to the UI, what they may do, and CSRF protection of every form.

Signing in takes an API token once: the browser then holds a signed, HTTP-only, SameSite=Lax
session cookie with the token's id, name and role (never the secret). Every page checks that the
token still exists and is not revoked, so revoking a token signs its browsers out at once.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from carrara.auth.principal import Principal
from carrara.auth.roles import Role
from carrara.auth.service import get_token, is_active
from carrara.deps import SessionDep, check_role, token_cache
from carrara.errors import NotFound

UI_PREFIX = "/ui"
SESSION_COOKIE = "carrara_ui"
SESSION_MAX_AGE_S = 12 * 3600  # a working day; signing in again only takes the token
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


class SignInRequired(Exception):
    """The page needs a signed-in user; the UI answers with a redirect to the sign-in page."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class CsrfFailed(Exception):
    """A form was posted without this session's CSRF token (forged, or from an old page)."""


class UiSessionMiddleware:
    """Starlette's signed-cookie sessions for the UI's paths only; `Secure` over https.

    The REST API stays stateless (it never sees the cookie). Behind a TLS-terminating proxy, run
    uvicorn with `--proxy-headers` so the scheme (and thus the Secure flag) is the client's.
    """

    def __init__(self, app: ASGIApp, secret_key: str) -> None:
        self.app = app
        common = {
            "secret_key": secret_key,
            "session_cookie": SESSION_COOKIE,
            "max_age": SESSION_MAX_AGE_S,
            "path": UI_PREFIX,
            "same_site": "lax",
        }
        self.plain = SessionMiddleware(app, https_only=False, **common)
        self.secure = SessionMiddleware(app, https_only=True, **common)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == UI_PREFIX or path.startswith(UI_PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        chosen = self.secure if scope.get("scheme") == "https" else self.plain
        await chosen(scope, receive, send)


async def page_session(request: Request, session: SessionDep) -> Session:
    """The request's database session, committed before the response is sent.

    Function scope matters for pages: after a form posts, the browser follows the redirect at
    once, and must find the change committed.
    """
    request.state.db = session
    return session


PageSession = Annotated[Session, Depends(page_session)]


async def form_data(request: Request) -> FormData:
    """The posted form (parsed once; Starlette caches it on the request)."""
    return await request.form()


FormDep = Annotated[FormData, Depends(form_data)]


def csrf_token(request: Request) -> str:
    """This browser session's CSRF token (created on first use)."""
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return str(token)


def check_csrf(request: Request, form: FormData) -> None:
    """CsrfFailed unless the form (or HTMX's header) carries this session's CSRF token."""
    expected = request.session.get("csrf")
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not expected or not isinstance(sent, str) or not secrets.compare_digest(sent, expected):
        raise CsrfFailed()


def sign_in(request: Request, principal: Principal) -> None:
    """Remember `principal` in the session cookie, with a fresh CSRF token (no fixation)."""
    request.session.clear()
    request.session.update(
        token_id=principal.token_id,
        name=principal.name,
        role=principal.role.value,
        csrf=secrets.token_urlsafe(32),
    )


def sign_out(request: Request) -> None:
    request.session.clear()


def signed_in_user(request: Request) -> Principal | None:
    """The principal `current_user` resolved for this request, if any."""
    return getattr(request.state, "user", None)


async def current_user(request: Request, session: PageSession) -> Principal:
    """The signed-in principal; SignInRequired when nobody is, or the token was revoked.

    Answered from the token cache (`CARRARA_AUTH_CACHE_S`, the bounds of carrara.auth.cache)
    when the session's token was checked recently: no query, and no connection held while the
    page waits for a thread (with every thread waiting for a connection, that stalled the API
    under overload until the pool's timeout)."""
    token_id = request.session.get("token_id")
    if not isinstance(token_id, int):
        raise SignInRequired()
    cache = token_cache(request)
    key = f"ui-session:{token_id}"
    hit = cache.get(key) if cache is not None else None
    if hit is not None and (hit.expires_at is None or datetime.now(UTC) < hit.expires_at):
        principal = hit.principal
    else:
        principal = await run_in_threadpool(_check_token, request, session, token_id, key)
    request.state.user = principal
    return principal


def _check_token(request: Request, session: Session, token_id: int, key: str) -> Principal:
    """The principal of token `token_id` if it is active (remembered under `key`); otherwise
    the browser session ends (SignInRequired)."""
    try:
        row = get_token(session, token_id)
    except NotFound:
        row = None
    if row is None or not is_active(row):
        sign_out(request)
        raise SignInRequired("your token was revoked, expired or deleted; sign in with another one")
    principal = Principal(token_id=row.id, name=row.name, role=Role(row.role))
    cache = token_cache(request)
    if cache is not None:
        cache.put(key, principal, row.prefix, row.expires_at)
    return principal


PageViewer = Annotated[Principal, Depends(current_user)]


async def current_editor(request: Request, user: PageViewer, form: FormDep) -> Principal:
    """A change posted by a signed-in editor: CSRF token checked, then the role (403)."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        check_csrf(request, form)
    # The API's own role rule: Forbidden names the role needed and the token's role.
    return check_role(user, Role.editor)


PageEditor = Annotated[Principal, Depends(current_editor)]


def can_edit(user: Principal | None) -> bool:
    """Whether to show edit controls (the server refuses edits of viewers regardless)."""
    return user is not None and user.can(Role.editor)
