"""The UI's page routes, one module per area; `carrara.ui.router` assembles them.

Pages are adapters over the domains' services, like the REST routers (never calling them): they
take their dependencies from `carrara.deps`, call service functions, and render what they return,
shaped with the API's own schemas so both show the same thing.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from carrara.pagination import PageParams, make_page_params
from carrara.ui.errors import PageRoute
from carrara.ui.security import UI_PREFIX

LIST_LIMIT = 50


def page_router() -> APIRouter:
    """A router whose routes render their errors as pages and stay out of the OpenAPI schema."""
    return APIRouter(route_class=PageRoute, include_in_schema=False)


def list_page(cursor: str | None, limit: int = LIST_LIMIT) -> PageParams:
    """The page of a list the `cursor` query parameter asks for (the API's pagination)."""
    return make_page_params(limit, cursor or None)


def redirect(path: str) -> RedirectResponse:
    """See-other redirect after a successful form post (the browser then GETs `path`)."""
    return RedirectResponse(UI_PREFIX + path, status_code=303)


def rolled_back(request: Request) -> None:
    """Undo what a failed change flushed before the form is shown again with its errors."""
    session = getattr(request.state, "db", None)
    if session is not None:
        session.rollback()


def query_value(value: str | None) -> str | None:
    """A filter from a GET form: an empty input means no filter."""
    value = (value or "").strip()
    return value or None
