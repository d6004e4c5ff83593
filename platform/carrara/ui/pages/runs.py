"""Training runs: list with filters, detail with live progress, compare, start, cancel."""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Query, Request, Response
from mlflow.exceptions import MlflowException
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.auth.service import Principal
from carrara.datasets import router as datasets_api
from carrara.errors import DomainError, Invalid, NotFound
from carrara.registry import router as registry_api
from carrara.registry.mlflow_sync import registry_client
from carrara.training import router as training_api
from carrara.training.router import RunId
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
from carrara.ui.pages import SettingsDep, list_page, page_router, query_value, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer
from carrara.ui.templating import flash, render

router = page_router()
# Metrics where a smaller value is the better one (everything else: larger is better).
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae", "brier"})
PLOTS = {
    "roc.png": "ROC curve",
    "confusion_matrix.png": "Confusion matrix",
    "feature_importance.png": "Feature importance",
}
MAX_COMPARED = 5
ACTIVE = ("queued", "running")


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
    page = training_api.list_runs(
        session,
        user,
        list_page(cursor),
        status=RunStatus(filters["status"]) if filters["status"] else None,
        dataset=filters["dataset"],
        algorithm=filters["algorithm"],
        registered_model_name=filters["model"],
    )
    context = {
        "nav": "runs",
        "page": page,
        "filters": {k: v or "" for k, v in filters.items()},
        "statuses": [s.value for s in RunStatus],
        "algorithms": [a.name for a in training_api.list_algorithms(user)],
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


def dataset_choices(session: Session, user: Principal) -> list[DatasetChoice]:
    """The newest versions of the newest datasets (what a run is usually started on)."""
    choices = []
    for dataset in datasets_api.list_datasets(session, user, list_page(None, 100)).items:
        versions = datasets_api.list_versions(dataset.name, session, user, list_page(None, 10))
        for version in versions.items:
            choices.append(
                DatasetChoice(
                    f"{dataset.name}@{version.number}",
                    dataset.name,
                    version.number,
                    dataset.task.value,
                    version.event_count,
                )
            )
    return choices


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


def algorithm_form(user: Principal, algorithm: str | None, task: str | None) -> AlgorithmForm:
    """The picker from `GET /api/v1/runs/algorithms`: params inputs from the chosen one's schema."""
    algorithms = training_api.list_algorithms(user)
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
    user: Principal,
    values: dict[str, Any],
    errors: dict[str, str],
    status: int = 200,
) -> Response:
    choices = dataset_choices(session, user)
    if not values.get("dataset_version") and choices:
        values["dataset_version"] = choices[0].value
    picker = algorithm_form(
        user, values.get("algorithm"), _task_of(choices, values.get("dataset_version"))
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
    return _new_run_form(request, session, user, values, {})


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
            task = datasets_api.get_dataset(choice[0], session, user).task.value
        except NotFound:
            task = None  # the picker then offers every algorithm; starting the run says why
    picker = algorithm_form(user, algorithm, task)
    context = {"picker": picker, "values": {}, "errors": {}}
    return render(request, "partials/algorithm_fields.html", context)


@router.post("/runs/new")
def start_run(request: Request, session: PageSession, user: PageEditor, form: FormDep) -> Response:
    """Start the run as `POST /api/v1/runs` does (with the form's idempotency key)."""
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    status = 422
    errors: dict[str, str] = {}
    choice = split_choice(text(form, "dataset_version"))
    algorithm = next(
        (a for a in training_api.list_algorithms(user) if a.name == text(form, "algorithm")), None
    )
    if choice is None:
        errors["dataset_version"] = "choose a dataset version (snapshot) to train on"
    if algorithm is None:
        errors["algorithm"] = "choose an algorithm"
    if choice is None or algorithm is None:
        return _new_run_form(request, session, user, values, errors, status)
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
        run = training_api.start_run(RunCreate.model_validate(body), session, user, Response(), key)
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
    return _new_run_form(request, session, user, values, errors, status)


# --- one run ------------------------------------------------------------------------------------


@dataclass
class MetricRow:
    """A holdout metric next to its baseline."""

    name: str
    value: Any
    baseline: Any
    lower_is_better: bool

    @property
    def lift(self) -> float | None:
        """How much better than the baseline (positive = better), when both are numbers."""
        if not isinstance(self.value, int | float) or not isinstance(self.baseline, int | float):
            return None
        difference = self.value - self.baseline
        return -difference if self.lower_is_better else difference


def metric_rows(metrics: dict[str, Any]) -> list[MetricRow]:
    """Each metric with its `baseline_<name>`, the ones with baselines first."""
    rows = []
    for name, value in metrics.items():
        if name.startswith("baseline_"):
            continue
        baseline = metrics.get(f"baseline_{name}")
        rows.append(MetricRow(name, value, baseline, name in LOWER_IS_BETTER))
    return sorted(rows, key=lambda r: (f"baseline_{r.name}" not in metrics, r.name))


def produced_version(session: Session, user: Principal, run: RunOut) -> int | None:
    """The version number of the model the run registered, from the registry's lineage."""
    if run.model_version_id is None:
        return None
    try:
        model = registry_api.get_model(run.registered_model_name, session, user)
    except NotFound:
        return None
    return next((v.version for v in model.versions if v.run and v.run.id == run.id), None)


@router.get("/runs/compare")
def compare_runs(
    request: Request,
    session: PageSession,
    user: PageViewer,
    ids: Annotated[list[int] | None, Query(max_length=MAX_COMPARED + 1)] = None,
) -> Response:
    """Two to five runs side by side: params (differences marked) and metrics (best marked)."""
    chosen = list(dict.fromkeys(ids or []))
    if not 2 <= len(chosen) <= MAX_COMPARED:
        raise Invalid(
            f"choose between 2 and {MAX_COMPARED} runs to compare (you chose {len(chosen)}): "
            "tick them in the runs list"
        )
    runs = [training_api.get_run(run_id, session, user) for run_id in sorted(chosen)]
    param_names = sorted({name for run in runs for name in run.params})
    metric_names = sorted(
        {n for run in runs for n in run.metrics if not n.startswith("baseline_")},
        key=lambda n: (not any(f"baseline_{n}" in r.metrics for r in runs), n),
    )
    best: dict[str, set[int]] = {}
    # Only evaluation metrics (those with a baseline) have a best; row counts do not.
    for name in (n for n in metric_names if any(f"baseline_{n}" in r.metrics for r in runs)):
        values = {
            run.id: run.metrics[name]
            for run in runs
            if isinstance(run.metrics.get(name), int | float)
            and not isinstance(run.metrics.get(name), bool)
        }
        if len(values) >= 2:
            target = (min if name in LOWER_IS_BETTER else max)(values.values())
            best[name] = {run_id for run_id, v in values.items() if v == target}
    differing = {n for n in param_names if len({repr(r.params.get(n)) for r in runs}) > 1}
    context = {
        "nav": "runs",
        "runs": runs,
        "param_names": param_names,
        "metric_names": metric_names,
        "best": best,
        "differing": differing,
    }
    return render(request, "runs/compare.html", context)


def _run_context(session: Session, user: Principal, run_id: int) -> dict[str, Any]:
    run = training_api.get_run(run_id, session, user)
    return {
        "nav": "runs",
        "run": run,
        "metric_rows": metric_rows(run.metrics),
        "model_version": produced_version(session, user, run),
        "active": run.status.value in ACTIVE,
    }


@router.get("/runs/{run_id}")
def run_detail(run_id: RunId, request: Request, session: PageSession, user: PageViewer) -> Response:
    """A run: status and live progress, params, metrics against the baseline, plots, lineage."""
    return render(request, "runs/detail.html", _run_context(session, user, run_id))


@router.get("/runs/{run_id}/progress")
def run_progress(
    run_id: RunId,
    request: Request,
    session: PageSession,
    user: PageViewer,
    was: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    """The status block, polled while the run is active; a finished run reloads the page."""
    context = _run_context(session, user, run_id)
    headers = {}
    if was in ACTIVE and not context["active"]:
        # Metrics, plots and the model version appear now: show the whole page again.
        headers["HX-Refresh"] = "true"
    return render(request, "partials/run_progress.html", context, headers=headers)


@router.post("/runs/{run_id}/cancel")
def cancel_run(run_id: RunId, request: Request, session: PageSession, user: PageEditor) -> Response:
    """Cancel a queued or running run, as `POST /api/v1/runs/{id}/cancel` does."""
    try:
        training_api.cancel_run(run_id, session, user)
    except DomainError as exc:
        rolled_back(request)
        flash(request, "error", exc.detail)
    else:
        flash(request, "success", f"Run #{run_id} cancelled.")
    return redirect(f"/runs/{run_id}")


@router.get("/runs/{run_id}/plots")
def run_plots(
    run_id: RunId, request: Request, session: PageSession, user: PageViewer, settings: SettingsDep
) -> Response:
    """The evaluation plots the run logged to MLflow (an HTMX fragment)."""
    run = training_api.get_run(run_id, session, user)
    plots: list[tuple[str, str]] = []
    problem = ""
    if run.mlflow_run_id:
        try:
            logged = registry_client(settings.mlflow_url).list_artifacts(run.mlflow_run_id, "plots")
        except MlflowException as exc:
            problem = f"MLflow at {settings.mlflow_url} did not answer: {exc.message}"
        else:
            names = {Path(item.path).name for item in logged}
            plots = [(name, title) for name, title in PLOTS.items() if name in names]
    context = {"run": run, "plots": plots, "problem": problem}
    return render(request, "partials/run_plots.html", context)


@router.get("/runs/{run_id}/plots/{plot}")
def run_plot(
    run_id: RunId,
    plot: str,
    session: PageSession,
    user: PageViewer,
    settings: SettingsDep,
) -> Response:
    """One evaluation plot (PNG), fetched from MLflow's artifact store."""
    if plot not in PLOTS:
        raise NotFound(f"run {run_id} has no plot {plot!r}")
    run = training_api.get_run(run_id, session, user)
    if not run.mlflow_run_id:
        raise NotFound(f"run {run_id} has no MLflow run yet")
    client = registry_client(settings.mlflow_url)
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run.mlflow_run_id, f"plots/{plot}", folder)
        except MlflowException as exc:
            raise NotFound(f"MLflow has no plot {plot} for run {run_id}: {exc.message}") from exc
        content = Path(path).read_bytes()
    # A run's artifacts never change: let the browser keep them.
    return Response(
        content, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
    )
