"""Registered models, versions and aliases: Carrara's mirror of MLflow's registry, with lineage.

MLflow holds the artifacts and is the registry of record for aliases; every alias change is made
in MLflow first and mirrored here in the same request, so scorers (which read MLflow) and the
control plane agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from carrara.audit.service import record
from carrara.auth.principal import Principal
from carrara.auth.roles import Role
from carrara.errors import Conflict, Forbidden, Invalid, NotFound
from carrara.models import (
    DatasetVersion,
    ModelAlias,
    ModelVersion,
    RegisteredModel,
    TrainingRun,
)
from carrara.pagination import PageParams, paginate
from carrara.registry import mlflow_sync
from carrara.registry.schemas import ALIAS_PATTERN

RESERVED_ALIASES = frozenset({"latest"})
_ALIAS_RE = re.compile(ALIAS_PATTERN)
_VERSION_ALIAS_RE = re.compile(r"^v\d+$")
MAX_SOURCE_LENGTH = 500  # model_versions.mlflow_source


def validate_alias(alias: str) -> None:
    """Raise Invalid unless `alias` is an alias both Carrara and MLflow accept."""
    if not _ALIAS_RE.match(alias):
        raise Invalid(
            f"alias '{alias}' must be a lowercase letter followed by up to 99 lowercase "
            "letters, digits, '_' or '-'"
        )
    if alias in RESERVED_ALIASES:
        raise Invalid(f"alias '{alias}' is reserved by MLflow")
    if _VERSION_ALIAS_RE.match(alias):
        raise Invalid(f"alias '{alias}' looks like a version reference (v<digits>); MLflow refuses")


def _model_query() -> Any:
    return select(RegisteredModel).options(
        selectinload(RegisteredModel.versions),
        selectinload(RegisteredModel.aliases).selectinload(ModelAlias.model_version),
    )


def list_models(
    session: Session, params: PageParams, name_prefix: str | None = None
) -> tuple[list[RegisteredModel], str | None]:
    """Registered models, newest first, optionally those whose name starts with `name_prefix`."""
    stmt = _model_query()
    if name_prefix:
        stmt = stmt.where(RegisteredModel.name.startswith(name_prefix, autoescape=True))
    return paginate(session, stmt, RegisteredModel.id, params)


def find_model(session: Session, name: str) -> RegisteredModel | None:
    return session.scalar(_model_query().where(RegisteredModel.name == name))


def get_model(session: Session, name: str) -> RegisteredModel:
    """The registered model `name` with its versions and aliases; NotFound if Carrara lacks it."""
    model = find_model(session, name)
    if model is None:
        raise NotFound(f"model '{name}' is not registered in Carrara")
    return model


def get_version(session: Session, name: str, version: int) -> ModelVersion:
    """Version `version` of model `name`; NotFound naming what is missing."""
    row = session.scalar(
        select(ModelVersion)
        .join(RegisteredModel)
        .where(RegisteredModel.name == name, ModelVersion.version == version)
    )
    if row is None:
        if find_model(session, name) is None:
            raise NotFound(f"model '{name}' is not registered in Carrara")
        raise NotFound(f"model '{name}' has no version {version} in Carrara")
    return row


def resolve_alias(session: Session, name: str, alias: str) -> ModelVersion:
    """The version alias `alias` of model `name` points at; NotFound if there is none."""
    row = session.scalar(
        select(ModelAlias)
        .join(RegisteredModel)
        .where(RegisteredModel.name == name, ModelAlias.alias == alias)
        .options(selectinload(ModelAlias.model_version))
    )
    if row is None:
        raise NotFound(f"model '{name}' has no alias '{alias}'")
    return row.model_version


def aliases_by_version(model: RegisteredModel) -> dict[int, list[str]]:
    """Version number -> its aliases, for a model loaded by `get_model`."""
    result: dict[int, list[str]] = {}
    for alias in model.aliases:
        result.setdefault(alias.model_version.version, []).append(alias.alias)
    return result


def load_lineage(session: Session, run_ids: list[int]) -> dict[int, TrainingRun]:
    """Training runs by id with their dataset version and dataset loaded (one query each)."""
    if not run_ids:
        return {}
    runs = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.id.in_(set(run_ids)))
        .options(selectinload(TrainingRun.dataset_version).selectinload(DatasetVersion.dataset))
    )
    return {run.id: run for run in runs}


def _get_or_create_model(session: Session, name: str, description: str = "") -> RegisteredModel:
    # INSERT ... ON CONFLICT DO NOTHING: two concurrent first versions of a model both succeed.
    session.execute(
        insert(RegisteredModel)
        .values(name=name, description=description)
        .on_conflict_do_nothing(index_elements=[RegisteredModel.name])
    )
    return get_model(session, name)


def register_version(
    session: Session,
    name: str,
    version: int,
    run_id: int | None,
    mlflow_source: str,
    metrics: dict[str, Any],
    *,
    artifact_digests: dict[str, str] | None = None,
    origin: str | None = None,
) -> ModelVersion:
    """Record version `version` of model `name` (registered in MLflow) with its lineage.

    `artifact_digests` pins the files scorers will load (carrara.artifacts). Idempotent for the
    same run (a retried training task gets the existing row back); Conflict if the version is
    already recorded for something else. Links the run to the version.
    """
    if len(mlflow_source) > MAX_SOURCE_LENGTH:
        raise Invalid(f"MLflow source of {name} v{version} is longer than {MAX_SOURCE_LENGTH}")
    model = _get_or_create_model(session, name)
    existing = next((v for v in model.versions if v.version == version), None)
    if existing is not None:
        if run_id is not None and existing.run_id == run_id:
            return existing
        raise Conflict(f"version {version} of model '{name}' is already registered in Carrara")
    row = ModelVersion(
        registered_model_id=model.id,
        version=version,
        run_id=run_id,
        mlflow_source=mlflow_source,
        metrics=metrics,
        artifact_digests=artifact_digests,
        origin=origin or ("training" if run_id is not None else "mlflow"),
    )
    try:
        # A savepoint, so a concurrent registration of the same version becomes a 409, not a 500.
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:
        raise Conflict(
            f"version {version} of model '{name}' is already registered in Carrara"
        ) from exc
    model.versions.append(row)
    if run_id is not None:
        run = session.get(TrainingRun, run_id)
        if run is None:
            raise NotFound(f"training run {run_id} does not exist")
        run.model_version_id = row.id
    return row


def set_trusted_code(
    session: Session, name: str, version: int, trusted: bool, reason: str, actor: Principal
) -> ModelVersion:
    """Mark (or unmark) version `version` of `name` as trusted code; admins only, audited.

    A trusted version may be loaded by scorers from formats that execute code (pickle,
    cloudpickle, pyfunc with bundled code). It takes effect at the deployment's next revision:
    the flag travels in the deployment spec, never through MLflow.
    """
    if not actor.can(Role.admin):
        raise Forbidden(
            f"marking a model version as trusted code needs the admin role; token "
            f"'{actor.name}' has role {actor.role}"
        )
    row = get_version(session, name, version)
    before = row.trusted_code
    row.trusted_code = trusted
    session.flush()
    record(
        session,
        actor,
        "model.version.trust" if trusted else "model.version.distrust",
        "model",
        name,
        before={"version": version, "trusted_code": before},
        after={"version": version, "trusted_code": trusted},
        detail=reason,
    )
    return row


def _upsert_alias(session: Session, model: RegisteredModel, alias: str, row: ModelVersion) -> None:
    current = next((a for a in model.aliases if a.alias == alias), None)
    if current is None:
        model.aliases.append(
            ModelAlias(registered_model_id=model.id, alias=alias, model_version=row)
        )
    else:
        current.model_version = row
    session.flush()


def import_version(
    session: Session, client: MlflowClient, name: str, version: int, actor: Principal
) -> ModelVersion:
    """Bring an existing MLflow registry version into Carrara (for models trained elsewhere).

    Conflict if Carrara already has it, NotFound if MLflow does not. The version's MLflow aliases
    are mirrored, and it is linked to a Carrara run when MLflow's run id belongs to one.
    """
    existing = find_model(session, name)
    if existing is not None and any(v.version == version for v in existing.versions):
        raise Conflict(f"version {version} of model '{name}' is already imported")
    found = mlflow_sync.fetch_version(client, name, version)
    description = mlflow_sync.fetch_model(client, name).description if existing is None else ""
    row = _record_mlflow_version(session, client, found, description)
    record(
        session,
        actor,
        "model.version.import",
        "model",
        name,
        after={
            "version": row.version,
            "mlflow_source": row.mlflow_source,
            "artifact_digests": row.artifact_digests,
        },
    )
    return row


def _record_mlflow_version(
    session: Session,
    client: MlflowClient,
    found: mlflow_sync.MlflowVersion,
    description: str = "",
    *,
    mirror_aliases: bool = True,
) -> ModelVersion:
    run_id = None
    if found.run_id:
        run_id = session.scalar(
            select(TrainingRun.id).where(TrainingRun.mlflow_run_id == found.run_id)
        )
    if description:
        _get_or_create_model(session, found.name, description)
    # Pinned now: what MLflow holds when Carrara first sees the version is what scorers load.
    digests = mlflow_sync.pin_version(client.tracking_uri, found.name, found.version)
    row = register_version(
        session,
        found.name,
        found.version,
        run_id,
        found.source,
        dict(found.metrics),
        artifact_digests=digests,
        origin="mlflow",
    )
    if mirror_aliases:
        model = get_model(session, found.name)
        for alias in found.aliases:
            if _mirrorable(alias):
                _upsert_alias(session, model, alias, row)
    return row


def _mirrorable(alias: str) -> bool:
    try:
        validate_alias(alias)
    except Invalid:
        return False
    return True


def set_alias(
    session: Session, client: MlflowClient, name: str, alias: str, version: int, actor: Principal
) -> tuple[ModelVersion, int | None]:
    """Point `alias` at `version` in MLflow's registry, then in Carrara; returns (row, previous).

    MLflow is called before anything is written here: if it is down (Unavailable, 503) Carrara is
    unchanged. If the database part fails after MLflow accepted the alias, the request rolls back
    and MLflow is ahead; that stays consistent because setting an alias is idempotent: the client's
    retry sets it again in both, and `sync_model` reconciles Carrara from MLflow at any time.
    """
    validate_alias(alias)
    row = get_version(session, name, version)
    model = get_model(session, name)
    previous = next((a.model_version.version for a in model.aliases if a.alias == alias), None)
    try:
        mlflow_sync.set_alias(client, name, alias, version)
    except NotFound as exc:
        raise Conflict(
            f"MLflow's registry has no version {version} of model '{name}' although Carrara "
            "does; it was deleted in MLflow"
        ) from exc
    _upsert_alias(session, model, alias, row)
    record(
        session,
        actor,
        "model.alias.set",
        "model",
        name,
        before={"alias": alias, "version": previous} if previous is not None else None,
        after={"alias": alias, "version": row.version},
    )
    return row, previous


def delete_alias(
    session: Session, client: MlflowClient, name: str, alias: str, actor: Principal
) -> int:
    """Remove `alias` from MLflow's registry, then from Carrara; returns the version it named."""
    model = get_model(session, name)
    current = next((a for a in model.aliases if a.alias == alias), None)
    if current is None:
        raise NotFound(f"model '{name}' has no alias '{alias}'")
    version = current.model_version.version
    # MLflow first, for the same reason as in `set_alias`; deleting is idempotent too.
    mlflow_sync.delete_alias(client, name, alias)
    model.aliases.remove(current)
    session.delete(current)
    session.flush()
    record(
        session,
        actor,
        "model.alias.delete",
        "model",
        name,
        before={"alias": alias, "version": version},
    )
    return version


@dataclass
class SyncResult:
    model: RegisteredModel
    imported_versions: list[int] = field(default_factory=list)
    aliases_set: dict[str, int] = field(default_factory=dict)
    aliases_removed: list[str] = field(default_factory=list)
    aliases_skipped: list[str] = field(default_factory=list)


def sync_model(session: Session, client: MlflowClient, name: str, actor: Principal) -> SyncResult:
    """Reconcile Carrara with MLflow's registry: import missing versions, mirror aliases."""
    remote = mlflow_sync.fetch_model(client, name)
    mlflow_aliases = remote.aliases
    existing = find_model(session, name)
    known = {v.version for v in existing.versions} if existing else set()
    result = SyncResult(model=existing or _get_or_create_model(session, name, remote.description))
    for version in remote.versions:
        if version not in known:
            found = mlflow_sync.fetch_version(client, name, version)
            # Aliases are reconciled below, all at once, so the result reports every change.
            _record_mlflow_version(session, client, found, mirror_aliases=False)
            result.imported_versions.append(version)
    model = get_model(session, name)
    rows = {v.version: v for v in model.versions}
    for alias, version in sorted(mlflow_aliases.items()):
        if not _mirrorable(alias) or version not in rows:
            result.aliases_skipped.append(alias)
            continue
        current = next((a for a in model.aliases if a.alias == alias), None)
        if current is None or current.model_version.version != version:
            _upsert_alias(session, model, alias, rows[version])
            result.aliases_set[alias] = version
    for stale in [a for a in model.aliases if a.alias not in mlflow_aliases]:
        model.aliases.remove(stale)
        session.delete(stale)
        result.aliases_removed.append(stale.alias)
    session.flush()
    result.model = get_model(session, name)
    record(
        session,
        actor,
        "model.sync",
        "model",
        name,
        after={
            "imported_versions": result.imported_versions,
            "aliases_set": result.aliases_set,
            "aliases_removed": result.aliases_removed,
        },
    )
    return result


def version_of_run(session: Session, name: str, run_id: int) -> int | None:
    """The version of model `name` that training run `run_id` registered, if any."""
    return session.scalar(
        select(ModelVersion.version)
        .join(RegisteredModel)
        .where(RegisteredModel.name == name, ModelVersion.run_id == run_id)
    )
