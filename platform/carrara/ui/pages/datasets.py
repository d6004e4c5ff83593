"""Datasets: list, detail (schema, live sample, versions), create, snapshot."""

from __future__ import annotations

import itertools
from typing import Annotated, Any

from fastapi import Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.datasets import sampling
from carrara.datasets import service as datasets
from carrara.datasets.schemas import (
    DatasetCreate,
    DatasetOut,
    DatasetVersionOut,
    SnapshotCreate,
)
from carrara.deps import DatasetName, SettingsDep
from carrara.errors import DomainError
from carrara.feature_sets import service as feature_sets
from carrara.feature_sets.schemas import FeatureSetRevisionOut
from carrara.pagination import Page
from carrara.streams.event_schema import FeatureType, Task
from carrara.streams.snapshot import SnapshotMode
from carrara.topic_policy import TopicPolicy
from carrara.training import service as training
from carrara.training.schemas import RunOut
from carrara.ui.forms import (
    FORM,
    FormInvalid,
    dataset_form,
    errors_from_problem,
    errors_from_validation,
    form_words,
    snapshot_body,
    text_problems,
)
from carrara.ui.pages import list_page, page_router, query_value, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer
from carrara.ui.templating import flash, render

router = page_router()


@router.get("/datasets")
def list_datasets(
    request: Request,
    session: PageSession,
    user: PageViewer,
    prefix: Annotated[str | None, Query(max_length=100)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Datasets, newest first, filtered by name prefix."""
    prefix = query_value(prefix)
    items, next_cursor = datasets.list_datasets(session, list_page(cursor), name_prefix=prefix)
    page = Page(items=[DatasetOut.model_validate(i) for i in items], next_cursor=next_cursor)
    context = {"nav": "datasets", "page": page, "prefix": prefix or "", "cursor": cursor}
    return render(request, "datasets/list.html", context)


def _new_form(
    request: Request, values: dict[str, Any], errors: dict[str, str], status: int = 200
) -> Response:
    context = {
        "nav": "datasets",
        "values": values,
        "errors": errors,
        "tasks": [t.value for t in Task],
        "feature_types": [t.value for t in FeatureType],
    }
    return render(request, "datasets/new.html", context, status_code=status)


@router.get("/datasets/_new")
def new_dataset(request: Request, user: PageEditor) -> Response:
    """The form that registers a dataset (a topic and its event schema)."""
    return _new_form(request, {"task": "binary", "partitions": "3"}, {})


@router.post("/datasets/_new")
def create_dataset(
    request: Request, session: PageSession, user: PageEditor, form: FormDep, settings: SettingsDep
) -> Response:
    """Register the dataset as `POST /api/v1/datasets` does; errors go back to the form."""
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    status = 422
    try:
        # Every invalid field at once: the form's own checks, then the API's model.
        raw, errors = dataset_form(form)
        try:
            body = DatasetCreate.model_validate(raw)
        except ValidationError as exc:
            errors = {**errors_from_validation(exc, fields=DatasetCreate.model_fields), **errors}
        if errors:
            raise FormInvalid(errors)
        created = datasets.create_dataset(
            session, settings.kafka_bootstrap, body, user, TopicPolicy.from_settings(settings)
        )
    except FormInvalid as exc:
        errors = exc.errors
    except DomainError as exc:
        rolled_back(request)
        errors, status = _problem_errors(exc), exc.status
    else:
        checked = (
            f"topic {created.dataset.topic} created"
            if created.topic_created
            else f"fields checked against version {created.subject_version} of the subject"
            if created.subject_version is not None
            else f"schema checked against {created.sample_size} recent events"
        )
        name = created.dataset.name
        flash(request, "success", f"Dataset {name} registered ({checked}).")
        return redirect(f"/datasets/{name}")
    return _new_form(request, values, errors, status)


def _problem_errors(exc: DomainError) -> dict[str, str]:
    """A domain error's per-field errors, and its detail at the top of the form."""
    errors = errors_from_problem(exc.extra.get("errors"), exc.detail)
    errors.setdefault(FORM, exc.detail)
    return {key: form_words(message) for key, message in errors.items()}


def same_events(versions: list[DatasetVersionOut]) -> dict[int, int]:
    """{version: the version before it} when both pin exactly the same offsets (no new events)."""
    ordered = sorted(versions, key=lambda v: v.number)
    return {
        b.number: a.number
        for a, b in itertools.pairwise(ordered)
        if b.number == a.number + 1 and b.offsets == a.offsets
    }


def _detail(
    request: Request,
    session: Session,
    name: str,
    *,
    snapshot_values: dict[str, Any] | None = None,
    snapshot_errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    row = datasets.get_dataset(session, name)
    dataset = DatasetOut.model_validate(row)
    feature_set = feature_sets.current_revision(session, row)
    versions, _ = datasets.list_versions(session, name, list_page(None))
    runs, _ = training.list_runs(session, list_page(None, 10), dataset=name)
    shown = [DatasetVersionOut.from_version(v) for v in versions]
    context = {
        "nav": "datasets",
        "dataset": dataset,
        "subject": sampling.subject_view(dataset.format, dataset.subject),
        "feature_set": None
        if feature_set is None
        else FeatureSetRevisionOut.model_validate(feature_set),
        "versions": shown,
        "same_as": same_events(shown),
        "runs": [RunOut.from_run(r) for r in runs],
        "modes": [m.value for m in SnapshotMode],
        "snapshot_values": snapshot_values or {"mode": "latest"},
        "snapshot_errors": snapshot_errors or {},
    }
    return render(request, "datasets/detail.html", context, status_code=status)


@router.get("/datasets/{name}")
def dataset_detail(
    name: DatasetName, request: Request, session: PageSession, user: PageViewer
) -> Response:
    """A dataset: schema, versions with offsets and counts, runs, and a live sample (lazy)."""
    return _detail(request, session, name)


@router.get("/datasets/{name}/sample")
def dataset_sample(
    name: DatasetName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    settings: SettingsDep,
) -> Response:
    """The newest events of the dataset's topic, each checked against the schema (a fragment)."""
    sample = sampling.sample_topic(session, settings.kafka_bootstrap, name)
    context = {"dataset": sample.dataset, "rows": sample.rows, "problem": sample.problem}
    return render(request, "partials/dataset_sample.html", context)


@router.post("/datasets/{name}/versions")
def create_snapshot(
    name: DatasetName,
    request: Request,
    session: PageSession,
    user: PageEditor,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """Pin the topic's offsets as the next version, as `POST …/versions` does."""
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    status = 422
    try:
        problems = text_problems(form, {"description": 10_000})
        if problems:
            raise FormInvalid(problems)
        body = SnapshotCreate.model_validate(snapshot_body(form))
        version = datasets.create_version(session, settings.kafka_bootstrap, name, body, user)
    except FormInvalid as exc:
        errors = exc.errors
    except ValidationError as exc:
        errors = errors_from_validation(exc)
    except DomainError as exc:
        rolled_back(request)
        errors, status = _problem_errors(exc), exc.status
    else:
        flash(
            request,
            "success",
            f"Snapshot v{version.number} pinned: {version.event_count:,} events "
            f"over {len(version.offsets)} partition(s).",
        )
        shown = [
            DatasetVersionOut.from_version(v)
            for v in datasets.list_versions(session, name, list_page(None, 2))[0]
        ]
        if version.number in same_events(shown):
            flash(
                request,
                "info",
                f"v{version.number} pins the same offsets as v{version.number - 1}: no new events "
                "arrived in between, so both train on the same events.",
            )
        return redirect(f"/datasets/{name}#versions")
    return _detail(
        request, session, name, snapshot_values=values, snapshot_errors=errors, status=status
    )
