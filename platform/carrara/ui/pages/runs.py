"""Training runs: the list with filters, and the form that starts a run.

One run's pages (detail, live progress, plots, compare, cancel) are in `run_detail`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.auth.principal import Principal
from carrara.datasets import service as datasets
from carrara.errors import DomainError, Invalid, NotFound
from carrara.pagination import Page
from carrara.training import service as training
from carrara.training.schemas import AlgorithmOut, RunCreate, RunOut, RunStatus
from carrara.ui.forms import (
    FORM,
    ParamField,
    errors_from_problem,
    errors_from_validation,
    param_errors,
    param_fields,
    params_from_form,
    text,
)
from carrara.ui.pages import list_page, page_router, query_value, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer
from carrara.ui.templating import flash, render

router = page_router()


@router.get("/runs")
def list_runs(
    request: Request,
    session: PageSession,
    user: PageViewer,
    status: Annotated[str | None, Query(max_length=20)] = None,
    dataset: Annotated[str | None, Query(max_length=100)] = None,
    algorithm: Annotated[str | None, Query(max_length=50)] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Runs, newest first, filtered by status, dataset, algorithm and model."""
    filters = {
        "status": query_value(status),
        "dataset": query_value(dataset),
        "algorithm": query_value(algorithm),
        "model": query_value(model),
    }
    if filters["status"] is not None and filters["status"] not in RunStatus.__members__:
        raise Invalid(f"unknown status {filters['status']!r}; use one of {', '.join(RunStatus)}")
    known = [a.name for a in training.algorithms()]
    if filters["algorithm"] is not None and filters["algorithm"] not in known:
        raise Invalid(f"unknown algorithm {filters['algorithm']!r}; use one of {', '.join(known)}")
    items, next_cursor = training.list_runs(
        session,
        list_page(cursor),
        status=filters["status"],
        dataset=filters["dataset"],
        algorithm=filters["algorithm"],
        registered_model_name=filters["model"],
    )
    page = Page(items=[RunOut.from_run(r) for r in items], next_cursor=next_cursor)
    context = {
        "nav": "runs",
        "page": page,
        "filters": {k: v or "" for k, v in filters.items()},
        "statuses": [s.value for s in RunStatus],
        "algorithms": [a.name for a in training.algorithms()],
        "cursor": cursor,
    }
    return render(request, "runs/list.html", context)


# --- starting a run ---------------------------------------------------------------------------


@dataclass
class DatasetChoice:
    """A dataset version a run can train on, as the picker lists it."""

    value: str  # "<dataset>@<number>"
    dataset: str
    number: int
    task: str
    events: int


def dataset_choices(session: Session) -> list[DatasetChoice]:
    """The newest versions of the newest datasets (what a run is usually started on)."""
    return [
        DatasetChoice(
            f"{dataset.name}@{version.number}",
            dataset.name,
            version.number,
            dataset.task,
            version.event_count,
        )
        for dataset, versions in datasets.recent_versions(session, datasets=100, per_dataset=10)
        for version in versions
    ]


def split_choice(value: str) -> tuple[str, int] | None:
    """'<dataset>@<number>' as (dataset, number), or None if it is not one."""
    dataset, _, number = value.rpartition("@")
    if not dataset or not number.isdigit():
        return None
    return dataset, int(number)


@dataclass
class AlgorithmForm:
    """The algorithm picker's state: what is offered, what is chosen, and its params inputs."""

    algorithms: list[AlgorithmOut]
    chosen: AlgorithmOut | None
    fields: list[ParamField]
    task: str | None
    unsupported: str  # why the chosen algorithm cannot train on the chosen dataset ('' if it can)


def algorithm_form(algorithm: str | None, task: str | None) -> AlgorithmForm:
    """The picker from `GET /api/v1/runs/algorithms`: params inputs from the chosen one's schema."""
    algorithms = training.algorithms()
    offered = [a for a in algorithms if task is None or task in a.tasks]
    chosen = next((a for a in algorithms if a.name == algorithm), None)
    if chosen is None and offered:
        chosen = offered[0]
    unsupported = ""
    if chosen is not None and task is not None and task not in chosen.tasks:
        unsupported = (
            f"{chosen.title} cannot train on a {task} dataset (it supports "
            f"{', '.join(chosen.tasks)})."
        )
    fields = param_fields(chosen.params_schema) if chosen else []
    return AlgorithmForm(offered or algorithms, chosen, fields, task, unsupported)


def _task_of(choices: list[DatasetChoice], value: str | None) -> str | None:
    return next((c.task for c in choices if c.value == value), None)


def _new_run_form(
    request: Request,
    session: Session,
    values: dict[str, Any],
    errors: dict[str, str],
    status: int = 200,
) -> Response:
    choices = dataset_choices(session)
    if not values.get("dataset_version") and choices:
        values["dataset_version"] = choices[0].value
    picker = algorithm_form(
        values.get("algorithm"), _task_of(choices, values.get("dataset_version"))
    )
    values.setdefault("idempotency_key", uuid.uuid4().hex)
    context = {
        "nav": "runs",
        "choices": choices,
        "picker": picker,
        "values": values,
        "errors": errors,
    }
    return render(request, "runs/new.html", context, status_code=status)


@router.get("/runs/new")
def new_run(
    request: Request,
    session: PageSession,
    user: PageEditor,
    dataset_version: Annotated[str | None, Query(max_length=120)] = None,
    algorithm: Annotated[str | None, Query(max_length=50)] = None,
) -> Response:
    """The form that starts a training run."""
    values = {
        "dataset_version": dataset_version or "",
        "algorithm": algorithm or "",
        "holdout_method": "hash",
        "holdout_fraction": "0.2",
        "holdout_seed": "0",
    }
    return _new_run_form(request, session, values, {})


@router.get("/runs/new/algorithm")
def algorithm_fields(
    request: Request,
    session: PageSession,
    user: PageEditor,
    dataset_version: Annotated[str | None, Query(max_length=120)] = None,
    algorithm: Annotated[str | None, Query(max_length=50)] = None,
) -> Response:
    """The algorithm picker and its params inputs for the chosen dataset (an HTMX fragment)."""
    choice = split_choice(dataset_version or "")
    task = None
    if choice is not None:
        try:
            task = datasets.get_dataset(session, choice[0]).task
        except NotFound:
            task = None  # the picker then offers every algorithm; starting the run says why
    picker = algorithm_form(algorithm, task)
    context = {"picker": picker, "values": {}, "errors": {}}
    return render(request, "partials/algorithm_fields.html", context)


@router.post("/runs/new")
def start_run(request: Request, session: PageSession, user: PageEditor, form: FormDep) -> Response:
    """Start the run as `POST /api/v1/runs` does (with the form's idempotency key)."""
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    status = 422
    errors: dict[str, str] = {}
    choice = split_choice(text(form, "dataset_version"))
    algorithm = next((a for a in training.algorithms() if a.name == text(form, "algorithm")), None)
    if choice is None:
        errors["dataset_version"] = "choose a dataset version (snapshot) to train on"
    if algorithm is None:
        errors["algorithm"] = "choose an algorithm"
    if choice is None or algorithm is None:
        return _new_run_form(request, session, values, errors, status)
    body = {
        "dataset": choice[0],
        "dataset_version": choice[1],
        "algorithm": algorithm.name,
        "params": params_from_form(param_fields(algorithm.params_schema), form),
        "holdout": {
            "method": text(form, "holdout_method") or "hash",
            "fraction": text(form, "holdout_fraction") or "0.2",
            "seed": text(form, "holdout_seed") or "0",
        },
        "registered_model_name": text(form, "registered_model_name"),
    }
    key = text(form, "idempotency_key")[:200] or None
    try:
        run = _start(session, user, RunCreate.model_validate(body), key)
    except ValidationError as exc:
        errors = errors_from_validation(exc)
        if "holdout" in errors:
            errors["holdout_fraction"] = errors.pop("holdout")
    except DomainError as exc:
        rolled_back(request)
        errors = param_errors(errors_from_problem(exc.extra.get("errors"), exc.detail))
        if exc.extra.get("errors"):
            errors.setdefault(FORM, "Some parameters are not valid: see the messages below.")
        status = exc.status
    else:
        flash(request, "success", f"Run #{run.id} queued: {run.algorithm} on {run.dataset}.")
        return redirect(f"/runs/{run.id}")
    return _new_run_form(request, session, values, errors, status)


def _start(session: Session, user: Principal, body: RunCreate, key: str | None) -> RunOut:
    """Queue the run as `POST /api/v1/runs` does (the same idempotency-key rules)."""
    run, _ = training.create_run(
        session,
        user,
        dataset=body.dataset,
        dataset_version=body.dataset_version,
        algorithm=body.algorithm,
        params=body.params,
        holdout=body.holdout.model_dump(mode="json"),
        registered_model_name=body.registered_model_name,
        idempotency_key=key,
    )
    return RunOut.from_run(run)
