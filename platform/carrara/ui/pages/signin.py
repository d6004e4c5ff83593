"""Signing in with an API token, and out."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request, Response

from carrara.auth.service import authenticate
from carrara.errors import Unauthorized
from carrara.ui.forms import text
from carrara.ui.pages import page_router, redirect
from carrara.ui.security import (
    UI_PREFIX,
    FormDep,
    PageSession,
    check_csrf,
    sign_in,
    sign_out,
)
from carrara.ui.templating import flash, render

router = page_router()
MAX_TOKEN_LENGTH = 200


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a UI path only (never another site: no open redirect)."""
    if (
        target
        and target.startswith(UI_PREFIX + "/")
        and not target.startswith("//")
        and "\\" not in target
        and "\n" not in target
    ):
        return target
    return UI_PREFIX + "/"


@router.get("/sign-in")
def sign_in_page(
    request: Request,
    next_: Annotated[str | None, Query(alias="next", max_length=2000)] = None,
    reason: Annotated[str | None, Query(max_length=300)] = None,
) -> Response:
    """The sign-in form: paste an API token."""
    return render(
        request, "sign_in.html", {"next": safe_next(next_), "reason": reason or "", "error": ""}
    )


@router.post("/sign-in")
def sign_in_submit(request: Request, session: PageSession, form: FormDep) -> Response:
    """Check the token; on success keep who it is in the session cookie (never the secret)."""
    check_csrf(request, form)
    token = text(form, "token")
    target = safe_next(text(form, "next"))
    error = ""
    if not token:
        error = "Paste an API token (it starts with crr_)."
    elif len(token) > MAX_TOKEN_LENGTH:
        error = "That is not an API token: tokens are much shorter."
    else:
        try:
            principal = authenticate(session, token)
        except Unauthorized as exc:
            error = f"Sign-in failed: {exc.detail}."
        else:
            sign_in(request, principal)
            flash(request, "success", f"Signed in as {principal.name} ({principal.role.value}).")
            return redirect(target.removeprefix(UI_PREFIX))
    context = {"next": target, "reason": "", "error": error}
    return render(request, "sign_in.html", context, status_code=401)


@router.post("/sign-out")
def sign_out_submit(request: Request, form: FormDep) -> Response:
    """Forget the signed-in token in this browser."""
    check_csrf(request, form)
    sign_out(request)
    flash(request, "info", "Signed out.")
    return redirect("/sign-in")
