"""The UI's routes under /ui, its static files under /ui/static, and `/` leading to it."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from carrara.ui.errors import error_page
from carrara.ui.pages import (
    datasets,
    deployment_edit,
    deployments,
    feature_sets,
    models,
    overview,
    page_router,
    run_detail,
    runs,
    signin,
)
from carrara.ui.security import UI_PREFIX, UiSessionMiddleware
from carrara.ui.templating import STATIC_DIR, assets_problem

log = structlog.get_logger(__name__)

fallback = page_router()
# In this order: `/runs/new` and `/deployments/_new` must not be taken for a run id or a
# deployment's name.
PAGES = (
    signin,
    overview,
    datasets,
    feature_sets,
    runs,
    run_detail,
    models,
    deployment_edit,
    deployments,
)


def _page_for(request: Request, url: str) -> str | None:
    """The page to show for `url` when it only takes form posts: the nearest page above it.

    After a form that failed, the address bar shows the URL it was posted to; reloading (or
    bookmarking) it sends a GET, which lands on the page the form belongs to instead of a 404.
    """

    def matches(path: str, method: str) -> bool:
        relative = path.removeprefix(UI_PREFIX)
        return any(
            isinstance(route, APIRoute)
            and method in (route.methods or ())
            and route.path_regex.fullmatch(relative) is not None
            for module in PAGES
            for route in module.router.routes
        )

    if not matches(url, "POST"):
        return None
    parent = url.rstrip("/")
    while "/" in parent.removeprefix(UI_PREFIX):
        parent = parent.rsplit("/", 1)[0]
        if matches(parent, "GET") or parent == UI_PREFIX:
            return parent if parent != UI_PREFIX else UI_PREFIX + "/"
    return None


@fallback.get("/{path:path}")
def not_found(path: str, request: Request) -> Response:
    """Any other /ui address: a page that says so (not a JSON problem)."""
    page = _page_for(request, f"{UI_PREFIX}/{path}")
    if page is not None:
        return RedirectResponse(page, status_code=303)
    return error_page(request, 404, "Not found", f"There is no page at /ui/{path}.")


def include_pages(app: FastAPI) -> None:
    """Every page and fragment of the UI, under /ui (kept out of the OpenAPI schema); each
    router straight in the app (nested routers are matched again per level: carrara.main)."""
    for router in [*(module.router for module in PAGES), fallback]:  # last: what nothing matched
        app.include_router(router, prefix=UI_PREFIX, include_in_schema=False)


VENDOR = UI_PREFIX + "/static/vendor"
FAVICON = UI_PREFIX + "/static/favicon.svg"


def install_api_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from the app's own pinned assets: no CDN, no Google fonts.

    The app is created with `docs_url=None, redoc_url=None`; these replace FastAPI's pages, which
    load their JS and CSS from jsdelivr and render blank on an air-gapped install.
    """
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} · REST API",
            swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui.css",
            swagger_favicon_url=FAVICON,
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} · REST API",
            redoc_js_url=f"{VENDOR}/redoc.standalone.js",
            redoc_favicon_url=FAVICON,
            with_google_fonts=False,
        )


def install_ui(app: FastAPI, secret_key: str) -> None:
    """Mount the UI on `app`: pages, static files, signed session cookies, `/` -> /ui/."""
    problem = assets_problem()
    if problem is not None:
        # The API still starts; every UI page answers 503 with this message until it is fixed.
        log.error("the web UI cannot be served", problem=problem)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(UI_PREFIX + "/", status_code=307)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> RedirectResponse:
        return RedirectResponse(FAVICON, status_code=308)

    if app.docs_url is None and app.redoc_url is None:
        install_api_docs(app)

    app.mount(
        UI_PREFIX + "/static",
        StaticFiles(directory=STATIC_DIR, check_dir=False),
        name="ui-static",
    )
    include_pages(app)
    app.add_middleware(UiSessionMiddleware, secret_key=secret_key)
