"""One training run: detail with live progress, evaluation plots, compare, cancel."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Query, Request, Response
from mlflow.exceptions import MlflowException
from sqlalchemy.orm import Session

from carrara.deps import RunId, SettingsDep
from carrara.errors import DomainError, Invalid, NotFound
from carrara.registry import service as registry
from carrara.registry.mlflow_sync import registry_client
from carrara.training import service as training
from carrara.training.schemas import RunOut
from carrara.ui.pages import page_router, redirect, rolled_back
from carrara.ui.security import PageEditor, PageSession, PageViewer
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


def _run(session: Session, run_id: int) -> RunOut:
    return RunOut.from_run(training.get_run(session, run_id))


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


def baseline_description(metrics: dict[str, Any]) -> str | None:
    """How the run's baseline was computed (training/evaluation.py), in words; None: none."""
    if not any(name.startswith("baseline_") for name in metrics):
        return None
    if "alert_rate" in metrics:
        return (
            "Random alerts at the model's own alert rate ({rate}): its expected precision is the "
            "holdout's anomaly rate and its expected recall the alert rate."
        ).format(rate=_share(metrics.get("alert_rate")))
    if "positive_rate" in metrics:
        return (
            "The majority-class baseline, a model without features: it scores every row with the "
            "training set's positive rate and predicts the training set's majority class for all "
            "of them (like scikit-learn's DummyClassifier). Its accuracy is therefore the "
            "holdout's share of that class, which can be below 50% when the holdout's majority "
            "differs "
            "(holdout positive rate: {rate})."
        ).format(rate=_share(metrics.get("positive_rate")))
    if "classes" in metrics:
        return (
            "The majority-class baseline, a model without features: it scores every row with the "
            "training set's class frequencies and predicts its most frequent class for all of them "
            "(like scikit-learn's DummyClassifier)."
        )
    return (
        "The mean baseline, a model without features: it predicts the training set's mean label "
        "for every row (like scikit-learn's DummyRegressor)."
    )


def _share(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, int | float) else "unknown"


def produced_version(session: Session, run: RunOut) -> int | None:
    """The version number of the model the run registered, from the registry's lineage."""
    if run.model_version_id is None:
        return None
    return registry.version_of_run(session, run.registered_model_name, run.id)


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
    runs = [_run(session, run_id) for run_id in sorted(chosen)]
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


def _run_context(session: Session, run_id: int) -> dict[str, Any]:
    run = _run(session, run_id)
    return {
        "nav": "runs",
        "run": run,
        "metric_rows": metric_rows(run.metrics),
        "baseline": baseline_description(run.metrics),
        "model_version": produced_version(session, run),
        "active": run.status.value in ACTIVE,
    }


@router.get("/runs/{run_id}")
def run_detail(run_id: RunId, request: Request, session: PageSession, user: PageViewer) -> Response:
    """A run: status and live progress, params, metrics against the baseline, plots, lineage."""
    return render(request, "runs/detail.html", _run_context(session, run_id))


@router.get("/runs/{run_id}/progress")
def run_progress(
    run_id: RunId,
    request: Request,
    session: PageSession,
    user: PageViewer,
    was: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    """The status block, polled while the run is active; a finished run reloads the page."""
    context = _run_context(session, run_id)
    headers = {}
    if was in ACTIVE and not context["active"]:
        # Metrics, plots and the model version appear now: show the whole page again.
        headers["HX-Refresh"] = "true"
    return render(request, "partials/run_progress.html", context, headers=headers)


@router.post("/runs/{run_id}/cancel")
def cancel_run(run_id: RunId, request: Request, session: PageSession, user: PageEditor) -> Response:
    """Cancel a queued or running run, as `POST /api/v1/runs/{id}/cancel` does."""
    try:
        training.cancel_run(session, user, run_id)
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
    run = _run(session, run_id)
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
    run = _run(session, run_id)
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
