"""Errors on UI routes become pages (or HTMX fragments) instead of JSON problem details.

A page route that raises rolls its database session back first: the error is shown, and nothing
the failed request flushed is committed.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import structlog
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from carrara.errors import DomainError, Forbidden, NotFound
from carrara.ui.security import UI_PREFIX, CsrfFailed, SignInRequired, signed_in_user
from carrara.ui.templating import AssetsMissing, is_htmx, render

log = structlog.get_logger(__name__)


def _sign_in_url(request: Request, reason: str) -> str:
    # Come back to the page asked for; after a failed POST, to the page the form was on.
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    if request.method != "GET" or is_htmx(request):
        target = request.headers.get("HX-Current-URL") or UI_PREFIX + "/"
    url = f"{UI_PREFIX}/sign-in?next={quote(target, safe='')}"
    return url + (f"&reason={quote(reason, safe='')}" if reason else "")


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    # A malformed name or id in the URL is a page that does not exist.
    if any(e.get("loc", ("",))[0] == "path" for e in errors):
        return 404, "There is no such page: the address names something that cannot exist."
    parts = [
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', '')}"
        for e in errors
    ]
    return 422, "; ".join(parts) or "the request is not valid"


def error_page(request: Request, status: int, title: str, detail: str) -> Response:
    """The error page, or an error fragment for HTMX (swapped into the element that asked)."""
    template = "partials/error.html" if is_htmx(request) else "error.html"
    context = {"status": status, "title": title, "detail": detail}
    return render(request, template, context, status_code=status)


async def _rollback(request: Request) -> None:
    session = getattr(request.state, "db", None)
    if session is not None:
        await run_in_threadpool(session.rollback)


async def page_error_response(request: Request, exc: Exception) -> Response:
    """What a UI route answers when it raised `exc`."""
    await _rollback(request)
    if isinstance(exc, SignInRequired):
        url = _sign_in_url(request, exc.reason)
        if is_htmx(request):
            return Response(status_code=204, headers={"HX-Redirect": url})
        return RedirectResponse(url, status_code=303)
    if isinstance(exc, AssetsMissing):
        log.error("cannot serve the web UI", problem=str(exc))
        text = html.escape(str(exc))
        return HTMLResponse(
            f"<!doctype html><title>Carrara UI unavailable</title><h1>Carrara UI unavailable</h1>"
            f"<p>{text}</p>",
            status_code=503,
        )
    if isinstance(exc, CsrfFailed):
        return error_page(
            request,
            403,
            "This form has expired",
            "The form was not sent from a current Carrara page of this browser session. "
            "Reload the page and submit it again.",
        )
    if isinstance(exc, Forbidden):
        user = signed_in_user(request)
        who = f"You are signed in as {user.name} ({user.role.value}). " if user else ""
        detail = exc.detail[:1].upper() + exc.detail[1:]
        return error_page(request, 403, "Not allowed", f"{who}{detail}.")
    if isinstance(exc, NotFound):
        return error_page(request, 404, "Not found", exc.detail)
    if isinstance(exc, DomainError):
        return error_page(request, exc.status, exc.title, exc.detail)
    if isinstance(exc, RequestValidationError):
        status, message = _validation_message(exc)
        return error_page(request, status, "Not found" if status == 404 else "Invalid", message)
    log.exception("unhandled error on a UI page", error=type(exc).__name__, path=request.url.path)
    return error_page(
        request,
        500,
        "Something went wrong",
        "An unexpected error occurred; it was logged. Try again, or tell your platform team.",
    )


class PageRoute(APIRoute):
    """An APIRoute whose errors are rendered as pages (see `page_error_response`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                try:
                    return await page_error_response(request, exc)
                except AssetsMissing as missing:
                    return await page_error_response(request, missing)

        return page_handler
