"""The UI's routes under /ui, its static files under /ui/static, and `/` leading to it."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from carrara.ui.errors import error_page
from carrara.ui.pages import (
    datasets,
    deployment_edit,
    deployments,
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


@fallback.get("/{path:path}")
def not_found(path: str, request: Request) -> Response:
    """Any other /ui address: a page that says so (not a JSON problem)."""
    return error_page(request, 404, "Not found", f"There is no page at /ui/{path}.")


def build_ui_router() -> APIRouter:
    """Every page and fragment of the UI, under /ui (kept out of the OpenAPI schema)."""
    ui = APIRouter(prefix=UI_PREFIX, include_in_schema=False)
    # In this order: `/runs/new` and `/deployments/_new` must not be taken for a run id or a
    # deployment's name.
    pages = (signin, overview, datasets, runs, run_detail, models, deployment_edit, deployments)
    for module in pages:
        ui.include_router(module.router)
    ui.include_router(fallback)  # last: only what no page matched
    return ui


def install_ui(app: FastAPI, secret_key: str) -> None:
    """Mount the UI on `app`: pages, static files, signed session cookies, `/` -> /ui/."""
    problem = assets_problem()
    if problem is not None:
        # The API still starts; every UI page answers 503 with this message until it is fixed.
        log.error("the web UI cannot be served", problem=problem)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(UI_PREFIX + "/", status_code=307)

    app.mount(
        UI_PREFIX + "/static",
        StaticFiles(directory=STATIC_DIR, check_dir=False),
        name="ui-static",
    )
    app.include_router(build_ui_router())
    app.add_middleware(UiSessionMiddleware, secret_key=secret_key)
