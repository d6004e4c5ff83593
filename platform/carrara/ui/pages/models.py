"""Registered models: versions with lineage (version -> run -> snapshot -> offsets), aliases."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.deps import AliasName, ModelName, SettingsDep
from carrara.errors import DomainError
from carrara.registry import service as registry
from carrara.registry import views as registry_views
from carrara.registry.mlflow_sync import registry_client
from carrara.registry.schemas import VersionRef
from carrara.ui.forms import FORM, errors_from_validation, text
from carrara.ui.pages import list_page, page_router, query_value, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer
from carrara.ui.templating import flash, render

router = page_router()
SUGGESTED_ALIASES = ("champion", "challenger")


@router.get("/models")
def list_models(
    request: Request,
    session: PageSession,
    user: PageViewer,
    prefix: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Registered models, newest first, with their latest version and aliases."""
    prefix = query_value(prefix)
    page = registry_views.model_summaries(session, list_page(cursor), prefix)
    context = {"nav": "models", "page": page, "prefix": prefix or "", "cursor": cursor}
    return render(request, "models/list.html", context)


def _detail(
    request: Request,
    session: Session,
    name: str,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    model = registry_views.model_detail(session, name)
    context = {
        "nav": "models",
        "model": model,
        "suggested_aliases": SUGGESTED_ALIASES,
        "values": values or {"alias": "champion"},
        "errors": errors or {},
    }
    return render(request, "models/detail.html", context, status_code=status)


@router.get("/models/{name}")
def model_detail(
    name: ModelName, request: Request, session: PageSession, user: PageViewer
) -> Response:
    """A model's versions (newest first) with lineage and metrics, and its aliases."""
    return _detail(request, session, name)


@router.post("/models/{name}/aliases")
def set_alias(
    name: ModelName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Point an alias at a version (in MLflow, then Carrara), as `PUT …/aliases/{alias}` does."""
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    alias = text(form, "alias")
    status = 422
    try:
        ref = VersionRef.model_validate({"version": text(form, "version")})
        client = registry_client(settings.mlflow_url)
        row, previous = registry.set_alias(session, client, name, alias, ref.version, user)
    except ValidationError as exc:
        errors = errors_from_validation(exc)
    except DomainError as exc:
        rolled_back(request)
        errors, status = {FORM: exc.detail}, exc.status
    else:
        moved = f" (was v{previous})" if previous not in (None, row.version) else ""
        flash(request, "success", f"{alias} → {name} v{row.version}{moved}.")
        return redirect(f"/models/{name}")
    return _detail(request, session, name, values, errors, status)


@router.post("/models/{name}/aliases/{alias}/delete")
def delete_alias(
    name: ModelName,
    alias: AliasName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    settings: SettingsDep,
) -> Response:
    """Remove an alias (from MLflow, then Carrara), as `DELETE …/aliases/{alias}` does."""
    try:
        client = registry_client(settings.mlflow_url)
        version = registry.delete_alias(session, client, name, alias, user)
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
    else:
        flash(request, "success", f"Alias {alias} removed (it pointed at v{version}).")
    return redirect(f"/models/{name}")
