"""Registered models: versions with lineage (version -> run -> snapshot -> offsets), aliases,
ONNX uploads and (admins) trusted code."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from carrara.auth.roles import Role
from carrara.datasets import service as datasets
from carrara.deployments import service as deployments
from carrara.deps import AliasName, ModelName, SettingsDep, VersionNumber
from carrara.errors import DomainError
from carrara.registry import service as registry
from carrara.registry import upload as registry_upload
from carrara.registry import views as registry_views
from carrara.registry.mlflow_sync import registry_client
from carrara.registry.schemas import MODEL_NAME_PATTERN, OnnxDeclaration, VersionRef
from carrara.ui.forms import FORM, errors_from_validation, optional, text
from carrara.ui.pages import list_page, page_router, query_value, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer, signed_in_user
from carrara.ui.templating import flash, render

router = page_router()
SUGGESTED_ALIASES = ("champion", "challenger")
OUTPUTS = {
    "probability": "Probability of the positive class (binary)",
    "class_scores": "A probability per class (multiclass)",
    "regression": "A predicted value (regression)",
    "anomaly_score": "An anomaly score, alert above a threshold",
}


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


def _upload_form(
    request: Request,
    session: Session,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    names = [d.name for d in datasets.list_datasets(session, list_page(None, limit=500))[0]]
    context = {
        "nav": "models",
        "datasets": names,
        "outputs": OUTPUTS,
        "name_pattern": MODEL_NAME_PATTERN,
        "values": values or {"output": "probability"},
        "errors": errors or {},
    }
    return render(request, "models/upload.html", context, status_code=status)


@router.get("/models/upload")
def upload_form(request: Request, session: PageSession, user: PageEditor) -> Response:
    """The form to upload an ONNX model trained anywhere, mapped to a dataset's features."""
    return _upload_form(request, session)


def _declaration(form: Any) -> OnnxDeclaration:
    classes = [c.strip() for c in text(form, "classes").split(",") if c.strip()]
    threshold = optional(form, "threshold")
    return OnnxDeclaration.model_validate(
        {
            "dataset": text(form, "dataset"),
            "features": [f.strip() for f in text(form, "features").split(",") if f.strip()],
            "output": text(form, "output"),
            "classes": [int(c) if c.lstrip("-").isdigit() else c for c in classes] or None,
            "threshold": threshold,
            "input_name": optional(form, "input_name"),
            "output_name": optional(form, "output_name"),
        }
    )


@router.post("/models/upload")
async def upload_model(
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Check and register an uploaded ONNX model, as a multipart `POST /models/{name}/versions`."""
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    name = text(form, "name")
    upload = form.get("file")
    status = 422
    errors: dict[str, str] = {}
    try:
        declaration = _declaration(form)
        if not re.fullmatch(MODEL_NAME_PATTERN, name):
            errors["name"] = "letters, digits, '.', '_' or '-', starting with a letter or digit"
        if not isinstance(upload, UploadFile):
            errors["file"] = "choose the .onnx file"
        if errors or not isinstance(upload, UploadFile):
            return _upload_form(request, session, values, errors, status)
        limit = settings.max_model_upload_bytes
        data = await upload.read(limit + 1)
        row = await run_in_threadpool(
            registry_upload.upload_onnx,
            session,
            tracking_uri=settings.mlflow_url,
            kafka_bootstrap=settings.kafka_bootstrap,
            name=name,
            model_bytes=data,
            declaration=declaration,
            actor=user,
            max_bytes=limit,
        )
    except ValidationError as exc:
        errors = errors_from_validation(exc)
    except DomainError as exc:
        rolled_back(request)
        errors, status = {FORM: exc.detail}, exc.status
    else:
        flash(request, "success", f"Uploaded {name} v{row.version}: checked and registered.")
        return redirect(f"/models/{name}#v{row.version}")
    return _upload_form(request, session, values, errors, status)


def _detail(
    request: Request,
    session: Session,
    name: str,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    model = registry_views.model_detail(session, name)
    user = signed_in_user(request)
    context = {
        "nav": "models",
        "model": model,
        "suggested_aliases": SUGGESTED_ALIASES,
        "values": values or {"alias": "champion"},
        "errors": errors or {},
        "can_admin": user is not None and user.can(Role.admin),
        "deployed": deployments.deployments_using(session, name),
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


@router.post("/models/{name}/versions/{version}/trust")
def set_trust(
    name: ModelName,
    version: VersionNumber,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
) -> Response:
    """Admins: mark (or unmark) a version as trusted code, as `PUT …/trust` does (audited)."""
    trusted = text(form, "trusted_code") == "true"
    try:
        registry.set_trusted_code(session, name, version, trusted, text(form, "reason"), user)
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
    else:
        state = "trusted code" if trusted else "no longer trusted code"
        flash(
            request,
            "success",
            f"{name} v{version} is {state}; deployments pick it up at their next revision.",
        )
    return redirect(f"/models/{name}#v{version}")
