"""`/api/v1/models`: adapters over `registry.service` (which talks to MLflow and audits)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from carrara.deps import (
    Admin,
    AliasName,
    Editor,
    ModelName,
    PageParamsDep,
    SessionDep,
    SettingsDep,
    VersionNumber,
    Viewer,
)
from carrara.errors import Invalid
from carrara.pagination import Page
from carrara.registry import service, upload, views
from carrara.registry.mlflow_sync import registry_client
from carrara.registry.schemas import (
    AliasOut,
    ModelOut,
    ModelSummary,
    OnnxDeclaration,
    SyncOut,
    TrustIn,
    VersionOut,
    VersionRef,
)

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=Page[ModelSummary])
def list_models(
    session: SessionDep,
    _: Viewer,
    params: PageParamsDep,
    name: Annotated[
        str | None, Query(max_length=200, description="Only models whose name starts with this")
    ] = None,
) -> Page[ModelSummary]:
    """Registered models, newest first, with their latest version and aliases."""
    return views.model_summaries(session, params, name)


@router.get("/{name}", response_model=ModelOut)
def get_model(name: ModelName, session: SessionDep, _: Viewer) -> ModelOut:
    """A registered model: versions (newest first) with lineage and metrics, and its aliases."""
    return views.model_detail(session, name)


@router.get("/{name}/versions/{version}", response_model=VersionOut)
def get_version(
    name: ModelName, version: VersionNumber, session: SessionDep, _: Viewer
) -> VersionOut:
    """One version: lineage (run -> dataset snapshot and offsets), metrics, aliases."""
    return views.version_detail(session, name, version)


_UPLOAD_FORM = {
    "type": "object",
    "required": ["file", "declaration"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "The .onnx file"},
        "declaration": {
            "type": "string",
            "description": "JSON of an OnnxDeclaration: dataset, features (the input "
            "tensor's columns, in order), output (probability | class_scores | regression | "
            "anomaly_score), classes, threshold, input_name, output_name",
        },
    },
}
_IMPORT_OR_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/VersionRef"}},
            "multipart/form-data": {"schema": _UPLOAD_FORM},
        },
    }
}


def _invalid_body(exc: ValidationError, prefix: tuple[str, ...] = ("body",)) -> Exception:
    return RequestValidationError(
        [{**e, "loc": (*prefix, *e.get("loc", ()))} for e in exc.errors(include_url=False)]
    )


async def _read_upload(request: Request, max_bytes: int) -> tuple[bytes, OnnxDeclaration]:
    """The uploaded file and its declaration from a multipart body (422 naming what is wrong)."""
    async with request.form(max_files=1, max_fields=5, max_part_size=64 * 1024) as form:
        upload = form.get("file")
        raw = form.get("declaration")
        if not isinstance(upload, StarletteUploadFile):
            raise RequestValidationError(
                [{"loc": ("body", "file"), "msg": "the .onnx file is required", "type": "missing"}]
            )
        if not isinstance(raw, str):
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "declaration"),
                        "msg": "the declaration (JSON) is required",
                        "type": "missing",
                    }
                ]
            )
        data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Invalid(f"the model is larger than the upload limit of {max_bytes} bytes")
    try:
        declaration = OnnxDeclaration.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid_body(exc, ("body", "declaration")) from exc
    return data, declaration


@router.post(
    "/{name}/versions",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_IMPORT_OR_UPLOAD,
)
async def import_version(
    name: ModelName,
    request: Request,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> VersionOut:
    """Add a version: import an existing MLflow registry version (JSON `{"version": n}`), or
    upload an `.onnx` model (multipart: `file` + `declaration`), checked against the dataset's
    recent events and registered in MLflow; up to `CARRARA_MAX_MODEL_UPLOAD_BYTES`."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        data, declaration = await _read_upload(request, settings.max_model_upload_bytes)

        def add_upload() -> VersionOut:
            row = upload.upload_onnx(
                session,
                tracking_uri=settings.mlflow_url,
                kafka_bootstrap=settings.kafka_bootstrap,
                name=name,
                model_bytes=data,
                declaration=declaration,
                actor=principal,
                max_bytes=settings.max_model_upload_bytes,
            )
            return views.version_detail(session, name, row.version)

        return await run_in_threadpool(add_upload)
    try:
        body = VersionRef.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _invalid_body(exc) from exc

    def add_import() -> VersionOut:
        client = registry_client(settings.mlflow_url)
        row = service.import_version(session, client, name, body.version, principal)
        return views.version_detail(session, name, row.version)

    return await run_in_threadpool(add_import)


@router.put("/{name}/versions/{version}/trust", response_model=VersionOut)
def set_trust(
    name: ModelName, version: VersionNumber, body: TrustIn, session: SessionDep, principal: Admin
) -> VersionOut:
    """Admins only, audited: allow (or forbid) scorers to load the version from formats that
    execute code (pickle, cloudpickle, pyfunc). Effective from the deployment's next revision."""
    service.set_trusted_code(session, name, version, body.trusted_code, body.reason, principal)
    return views.version_detail(session, name, version)


@router.put("/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(
    name: ModelName,
    alias: AliasName,
    body: VersionRef,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> AliasOut:
    """Point an alias at a version, in MLflow's registry and in Carrara (503 if MLflow is down)."""
    client = registry_client(settings.mlflow_url)
    row, previous = service.set_alias(session, client, name, alias, body.version, principal)
    return AliasOut(model=name, alias=alias, version=row.version, previous_version=previous)


@router.delete("/{name}/aliases/{alias}", response_model=AliasOut)
def delete_alias(
    name: ModelName,
    alias: AliasName,
    session: SessionDep,
    principal: Editor,
    settings: SettingsDep,
) -> AliasOut:
    """Remove an alias, from MLflow's registry and from Carrara (503 if MLflow is down)."""
    client = registry_client(settings.mlflow_url)
    version = service.delete_alias(session, client, name, alias, principal)
    return AliasOut(model=name, alias=alias, version=version, previous_version=version)


@router.post("/{name}/sync", response_model=SyncOut)
def sync_model(
    name: ModelName, session: SessionDep, principal: Editor, settings: SettingsDep
) -> SyncOut:
    """Reconcile from MLflow's registry: import missing versions, mirror its aliases."""
    result = service.sync_model(session, registry_client(settings.mlflow_url), name, principal)
    return views.sync_out(session, result)
