"""Datasets: list, detail (schema, live sample, versions), create, snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from confluent_kafka import KafkaException
from fastapi import Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.auth.service import Principal
from carrara.datasets import router as datasets_api
from carrara.datasets import service as datasets
from carrara.datasets.router import NamePath
from carrara.datasets.schemas import DatasetCreate, SnapshotCreate
from carrara.errors import DomainError
from carrara.models import Dataset
from carrara.streams.event_schema import FeatureType, Task, decode_event, validate_events
from carrara.streams.snapshot import SampledEvent, SnapshotMode, TopicNotFound, read_recent_events
from carrara.training import router as training_api
from carrara.ui.forms import (
    FORM,
    FormInvalid,
    errors_from_problem,
    errors_from_validation,
    snapshot_body,
)
from carrara.ui.forms import dataset_body as parse_dataset_form
from carrara.ui.pages import SettingsDep, list_page, page_router, query_value, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer
from carrara.ui.templating import flash, render

router = page_router()
SAMPLE_SIZE = 20
SAMPLE_TIMEOUT_S = 5.0
MAX_SHOWN_BYTES = 2000


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
    page = datasets_api.list_datasets(session, user, list_page(cursor), name_prefix=prefix)
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
        body = DatasetCreate.model_validate(parse_dataset_form(form))
        created = datasets_api.create_dataset(body, session, user, settings)
    except FormInvalid as exc:
        errors = exc.errors
    except ValidationError as exc:
        errors = errors_from_validation(exc)
    except DomainError as exc:
        rolled_back(request)
        errors, status = _problem_errors(exc), exc.status
    else:
        checked = (
            f"topic {created.topic} created"
            if created.topic_created
            else f"schema checked against {created.sample_size} recent events"
        )
        flash(request, "success", f"Dataset {created.name} registered ({checked}).")
        return redirect(f"/datasets/{created.name}")
    return _new_form(request, values, errors, status)


def _problem_errors(exc: DomainError) -> dict[str, str]:
    """A domain error's per-field errors, and its detail at the top of the form."""
    errors = errors_from_problem(exc.extra.get("errors"), exc.detail)
    errors.setdefault(FORM, exc.detail)
    return errors


def _detail(
    request: Request,
    session: Session,
    user: Principal,
    name: str,
    *,
    snapshot_values: dict[str, Any] | None = None,
    snapshot_errors: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    dataset = datasets_api.get_dataset(name, session, user)
    versions = datasets_api.list_versions(name, session, user, list_page(None)).items
    runs = training_api.list_runs(session, user, list_page(None, 10), dataset=name).items
    context = {
        "nav": "datasets",
        "dataset": dataset,
        "versions": versions,
        "runs": runs,
        "modes": [m.value for m in SnapshotMode],
        "snapshot_values": snapshot_values or {"mode": "latest"},
        "snapshot_errors": snapshot_errors or {},
    }
    return render(request, "datasets/detail.html", context, status_code=status)


@router.get("/datasets/{name}")
def dataset_detail(
    name: NamePath, request: Request, session: PageSession, user: PageViewer
) -> Response:
    """A dataset: schema, versions with offsets and counts, runs, and a live sample (lazy)."""
    return _detail(request, session, user, name)


@dataclass
class SampleRow:
    """One recent event of the topic, as the sample panel shows it."""

    partition: int
    offset: int
    timestamp_ms: int | None
    key_text: str
    value_text: str
    mismatches: list[str]


def sample_rows(dataset: Dataset, events: list[SampledEvent]) -> list[SampleRow]:
    """Recent events with the schema fields each one disagrees with (the API's schema check)."""
    schema = datasets.event_schema(dataset)
    rows = []
    for event in events:
        decoded = decode_event(event.value)
        shown = (
            orjson.dumps(decoded, option=orjson.OPT_INDENT_2).decode()
            if isinstance(decoded, dict)
            else (event.value or b"").decode("utf-8", "replace")
        )
        if len(shown) > MAX_SHOWN_BYTES:
            shown = shown[:MAX_SHOWN_BYTES] + "\n…"
        key = decoded.get(dataset.key_field) if isinstance(decoded, dict) else None
        mismatches = [m.field for m in validate_events(schema, [event.value])]
        rows.append(
            SampleRow(
                partition=event.partition,
                offset=event.offset,
                timestamp_ms=event.timestamp_ms,
                key_text="—" if key is None else str(key),
                value_text=shown,
                mismatches=mismatches,
            )
        )
    return rows


@router.get("/datasets/{name}/sample")
def dataset_sample(
    name: NamePath,
    request: Request,
    session: PageSession,
    user: PageViewer,
    settings: SettingsDep,
) -> Response:
    """The newest events of the dataset's topic, each checked against the schema (a fragment)."""
    dataset = datasets.get_dataset(session, name)
    problem = ""
    rows: list[SampleRow] = []
    try:
        events = read_recent_events(
            settings.kafka_bootstrap, dataset.topic, SAMPLE_SIZE, SAMPLE_TIMEOUT_S
        )
        rows = sample_rows(dataset, events)
    except TopicNotFound:
        problem = f"Topic {dataset.topic} no longer exists in Kafka."
    except KafkaException as exc:
        problem = f"Kafka at {settings.kafka_bootstrap} did not answer: {exc.args[0]}"
    context = {"dataset": dataset, "rows": rows, "problem": problem}
    return render(request, "partials/dataset_sample.html", context)


@router.post("/datasets/{name}/versions")
def create_snapshot(
    name: NamePath,
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
        body = SnapshotCreate.model_validate(snapshot_body(form))
        version = datasets_api.create_version(name, body, session, user, settings)
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
        return redirect(f"/datasets/{name}#versions")
    return _detail(
        request, session, user, name, snapshot_values=values, snapshot_errors=errors, status=status
    )
