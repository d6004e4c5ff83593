"""Editing a deployment: the form, the diff to confirm, applying it; rolling back to a revision."""

from __future__ import annotations

import re
from typing import Annotated, Any

import orjson
from fastapi import Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.auth.principal import Principal
from carrara.deployments import service as deployments
from carrara.deployments.schemas import (
    NAME_PATTERN,
    DeploymentPut,
    MonitoringConfig,
    RevisionOut,
    RollbackIn,
)
from carrara.deps import DeploymentName, SettingsDep
from carrara.errors import DomainError, Invalid, NotFound
from carrara.registry import service as registry
from carrara.settings import Settings
from carrara.ui.deployment_forms import (
    MAX_VARIANT_ROWS,
    TEXT_LIMITS,
    deployment_body,
    deployment_errors,
    spec_diff,
    variant_rows_index,
    with_challenger,
)
from carrara.ui.forms import (
    checked,
    errors_from_problem,
    human_pattern,
    text,
    text_problems,
)
from carrara.ui.pages import list_page, page_router, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession
from carrara.ui.templating import flash, render

router = page_router()
_NAME = re.compile(NAME_PATTERN)
CHALLENGER_WEIGHT = 10


def _model_names(session: Session) -> list[str]:
    models, _ = registry.list_models(session, list_page(None, 200))
    return [m.name for m in models]


def _form_values(spec: dict[str, Any], variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Form inputs showing `spec` with `variants` (one row each, then blank rows)."""
    monitoring = spec.get("monitoring") or {}
    values: dict[str, Any] = {
        key: spec.get(key) or "" for key in ("input_topic", "output_topic", "key_field", "pool")
    }
    values["description"] = spec.get("description") or ""
    values["outcomes_topic"] = monitoring.get("outcomes_topic") or ""
    defaults = MonitoringConfig()
    values["outcome_field"] = monitoring.get("outcome_field") or defaults.outcome_field
    values["join_by"] = monitoring.get("join_by") or defaults.join_by
    for i, variant in enumerate(variants[:MAX_VARIANT_ROWS]):
        prefix = f"variants-{i}-"
        version = variant.get("version") if variant.get("version") is not None else ""
        values[prefix + "name"] = variant.get("name", "")
        values[prefix + "model"] = variant.get("model", "")
        values[prefix + "version"] = str(variant.get("alias") or version)
        values[prefix + "weight"] = str(variant.get("weight", 0))
        values[prefix + "shadow"] = "on" if variant.get("shadow") else ""
        if variant.get("shadow") and variant.get("shadow_sample_pct") not in (None, 100.0):
            values[prefix + "shadow_sample_pct"] = str(variant["shadow_sample_pct"])
    return values


def _edit_form(
    request: Request,
    session: Session,
    *,
    name: str | None,
    values: dict[str, Any],
    errors: dict[str, str],
    status: int = 200,
    revision: int | None = None,
) -> Response:
    rows = max(3, 1 + sum(1 for i in range(MAX_VARIANT_ROWS) if values.get(f"variants-{i}-name")))
    context = {
        "nav": "deployments",
        "name": name,
        "values": values,
        "errors": errors,
        "rows": min(rows, MAX_VARIANT_ROWS),
        "models": _model_names(session),
        "pools": deployments.known_pools(session),
        "revision": revision,
    }
    return render(request, "deployments/edit.html", context, status_code=status)


@router.get("/deployments/_new")
def new_deployment(request: Request, session: PageSession, user: PageEditor) -> Response:
    """The form that creates a deployment (its first revision)."""
    values = _form_values({"pool": "default"}, [{"name": "champion", "weight": 100}])
    return _edit_form(request, session, name=None, values=values, errors={})


@router.get("/deployments/{name}/edit")
def edit_deployment(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    challenger: Annotated[bool, Query()] = False,
) -> Response:
    """The current spec as a form; `?challenger=true` adds a challenger at 10% of the traffic."""
    detail = deployments.deployment_detail(session, name)
    if detail.spec is None:
        raise Invalid(f"deployment '{name}' is stopped: roll back to a revision to restart it")
    spec = detail.spec.model_dump(mode="json")
    variants = spec["variants"]
    if challenger:
        variants = with_challenger(variants, *_challenger_for(session, spec))
    values = _form_values(spec, variants)
    if challenger:
        values["reason"] = f"add a challenger at {CHALLENGER_WEIGHT}%"
    return _edit_form(
        request, session, name=name, values=values, errors={}, revision=detail.revision
    )


def _challenger_for(session: Session, spec: dict[str, Any]) -> tuple[str, str, int | None]:
    """(name, model, version) of a new challenger: the champion's model, newest version."""
    taken = {v["name"] for v in spec["variants"]}
    candidates = ("challenger", *(f"challenger-{i}" for i in range(2, 99)))
    name = next(n for n in candidates if n not in taken)
    model = deployments.variant_of(spec, deployments.champion_of(spec))["model"]
    try:
        versions = registry.get_model(session, model).versions
    except NotFound:
        return name, model, None
    return name, model, versions[-1].version if versions else None


def _current_spec(session: Session, name: str) -> tuple[dict[str, Any] | None, int | None]:
    """The current spec (None if stopped or new) and revision (None if new) of `name`."""
    try:
        _, current = deployments.get_deployment(session, name)
    except NotFound:
        return None, None
    return (dict(current.spec) if current.spec else None), current.number


def _dry_run(
    session: Session,
    settings: Settings,
    user: Principal,
    name: str,
    body: DeploymentPut,
    created: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], bool]:
    """(spec, changed) that `PUT` would store for `body`, with every check `PUT` makes.

    The deployments service applies the body inside a savepoint that is then rolled back:
    nothing is stored or published, and the diff shows exactly what would be.
    """
    savepoint = session.begin_nested()
    try:
        publishing = deployments.publishing(settings)
        applied = deployments.apply(session, name, body, user, publishing, created_topics=created)
        return dict(applied.revision.spec or {}), applied.changed
    finally:
        savepoint.rollback()


def _output_partitions(form: Any, settings: Settings, errors: dict[str, str]) -> int | None:
    """Partitions of the output topic to create (None: the form uses an existing one)."""
    if not checked(form, "create_output_topic"):
        return None
    raw = text(form, "output_partitions") or "3"
    limit = settings.max_topic_partitions
    if not raw.isdigit() or not 1 <= int(raw) <= limit:
        errors["output_partitions"] = f"a whole number of partitions, 1 to {limit}"
        return None
    return int(raw)


def _unknown_models(session: Session, form: Any) -> dict[str, str]:
    """Errors on the model inputs naming a model the registry does not have."""
    known = set(_model_names(session))
    errors = {}
    for i in variant_rows_index(form):
        model = text(form, f"variants-{i}-model")
        if model and model not in known:
            errors[f"variants-{i}-model"] = (
                f"Variant {i + 1} model: no registered model is named '{model}'"
            )
    return errors


def _preview(
    request: Request,
    session: Session,
    user: Principal,
    form: Any,
    settings: Settings,
    name: str,
    *,
    creating: bool,
) -> Response:
    """Validate the edit form as `PUT` would and show the diff to confirm, or the form again.

    Every invalid input is reported at once: the text checks, the body's validation and the
    unknown models are collected before anything is tried against the database or Kafka.
    """
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    current, revision = _current_spec(session, name)
    status = 422
    errors = text_problems(form, TEXT_LIMITS, multiline=frozenset())
    if "name" not in errors and not _NAME.match(name):
        errors["name"] = "required" if not name else human_pattern(NAME_PATTERN)
    elif creating and revision is not None:
        errors["name"] = f"deployment '{name}' already exists: open it and edit it instead"
        status = 409
    partitions = _output_partitions(form, settings, errors)
    body: DeploymentPut | None = None
    try:
        body = DeploymentPut.model_validate(deployment_body(form, current))
    except ValidationError as exc:
        errors = {**deployment_errors(exc, form), **errors}
    errors = {**_unknown_models(session, form), **errors}
    if body is not None and not errors:
        publishing = deployments.publishing(settings)
        try:
            created: frozenset[str] = frozenset()
            if partitions is not None:
                deployments.check_output_topic_creation(
                    publishing, body.output_topic, partitions, body.pool
                )
                created = frozenset({body.output_topic})
            spec, changed = _dry_run(session, settings, user, name, body, created)
        except DomainError as exc:
            rolled_back(request)
            problem: dict[str, str] = errors_from_problem(exc.extra.get("errors"), exc.detail)
            errors = {_PROBLEM_FIELDS.get(k, k): v for k, v in problem.items()}
            status = exc.status
        else:
            pools = deployments.known_pools(session)
            context = {
                "nav": "deployments",
                "name": name,
                "title": f"Create deployment {name}" if revision is None else f"Change {name}",
                "diff": spec_diff(current, spec),
                "changed": changed,
                "reason": body.reason,
                "revision": revision,
                "body_json": orjson.dumps(body.model_dump(mode="json", exclude_none=True)).decode(),
                "action": f"/ui/deployments/{name}/apply",
                "rollback_to": None,
                "create_topic": (body.output_topic, partitions) if partitions else None,
                "unknown_pool": None if body.pool in pools else body.pool,
                "pools": pools,
            }
            return render(request, "deployments/confirm.html", context)
    values["name"] = name
    return _edit_form(
        request,
        session,
        name=None if creating else name,
        values=values,
        errors=errors,
        status=status,
        revision=revision,
    )


# A domain error's field (the API's body) as the form's input.
_PROBLEM_FIELDS = {
    "monitoring.outcomes_topic": "outcomes_topic",
    "create_topic.partitions": "output_partitions",
}


@router.post("/deployments/_new")
def preview_new(
    request: Request, session: PageSession, user: PageEditor, form: FormDep, settings: SettingsDep
) -> Response:
    """Validate a new deployment and show its first revision, to confirm."""
    name = text(form, "name")
    return _preview(request, session, user, form, settings, name, creating=True)


@router.post("/deployments/{name}/preview")
def preview_change(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Validate the edited spec and show what the new revision would change, to confirm."""
    return _preview(request, session, user, form, settings, name, creating=False)


def _unchanged_since(session: Session, name: str, form: Any) -> None:
    """Conflict-like Invalid if the deployment changed after the diff was shown."""
    _, revision = _current_spec(session, name)
    expected = text(form, "expected_revision")
    if (str(revision) if revision is not None else "") != expected:
        raise Invalid(
            f"deployment '{name}' changed while you were reviewing (now revision {revision}); "
            "review the change again"
        )


@router.post("/deployments/{name}/apply")
def apply_change(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Store the confirmed desired state, as `PUT /api/v1/deployments/{name}` does."""
    try:
        _unchanged_since(session, name, form)
        body = DeploymentPut.model_validate_json(text(form, "body"))
        publishing = deployments.publishing(settings)
        created = ""
        partitions = text(form, "create_output_topic")
        if partitions.isdigit():
            deployments.create_output_topic(
                publishing, body.output_topic, int(partitions), body.pool
            )
            created = f" Topic {body.output_topic} created with {partitions} partitions."
        applied = deployments.applied_out(
            session, deployments.apply(session, name, body, user, publishing)
        )
    except ValidationError as exc:
        flash(request, "error", f"The change is not valid any more: {exc.errors()[0]['msg']}")
        return redirect(f"/deployments/{name}")
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
        return redirect(f"/deployments/{name}" if _exists(session, name) else "/deployments")
    if applied.changed:
        flash(
            request,
            "success",
            f"Revision {applied.revision} stored and published to scorers.{created}",
        )
    else:
        flash(request, "info", f"No change: revision {applied.revision} already has this spec.")
    return redirect(f"/deployments/{name}")


def _exists(session: Session, name: str) -> bool:
    return _current_spec(session, name)[1] is not None


def find_revision(session: Session, name: str, number: int) -> RevisionOut:
    """Revision `number` of `name` (one query)."""
    return deployments.revision_out(deployments.get_revision(session, name, number))


@router.post("/deployments/{name}/rollback/preview")
def preview_rollback(
    name: DeploymentName, request: Request, session: PageSession, user: PageEditor, form: FormDep
) -> Response:
    """Show what rolling back to a revision would change, to confirm."""
    number = text(form, "revision")
    if not number.isdigit():
        raise Invalid("choose the revision to roll back to")
    target = find_revision(session, name, int(number))
    current, revision = _current_spec(session, name)
    if target.spec is None:
        raise Invalid(f"revision {target.number} is a stop: it has nothing to roll back to")
    after = target.spec.model_dump(mode="json")  # as stored: the same shape as `current`
    diff = spec_diff(current, after)
    context = {
        "nav": "deployments",
        "name": name,
        "title": f"Roll {name} back to revision {target.number}",
        "diff": diff,
        "changed": True,
        "reason": "",
        "revision": revision,
        "body_json": "",
        "action": f"/ui/deployments/{name}/rollback",
        "rollback_to": target,
        "create_topic": None,
        "unknown_pool": None,
        "pools": [],
    }
    return render(request, "deployments/confirm.html", context)


@router.post("/deployments/{name}/rollback")
def rollback(
    name: DeploymentName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Roll back to the confirmed revision, as `POST …/rollback` does (a new revision)."""
    try:
        _unchanged_since(session, name, form)
        body = RollbackIn.model_validate(
            {"revision": text(form, "rollback_to"), "reason": text(form, "reason")}
        )
        applied = deployments.applied_out(
            session,
            deployments.rollback(
                session, name, body.revision, body.reason, user, deployments.publishing(settings)
            ),
        )
    except ValidationError as exc:
        flash(request, "error", f"The rollback is not valid: {exc.errors()[0]['msg']}")
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
    else:
        flash(
            request,
            "success",
            f"Rolled back: revision {applied.revision} restores revision {body.revision}.",
        )
    return redirect(f"/deployments/{name}")
