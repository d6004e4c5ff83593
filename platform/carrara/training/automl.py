"""AutoML (`algorithm: auto`): a time-budgeted Optuna search over the families suited to the task.

Optuna was picked over FLAML: it is the more actively maintained of the two and its study/trial
model maps one-to-one onto MLflow child runs. Candidates are compared on a validation split carved
out of the training data (by the same deterministic hashing as the holdout), never on the holdout
itself, so the holdout metrics of the winner stay an honest estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from sklearn.metrics import log_loss, mean_squared_error, roc_auc_score

from carrara.training.algorithms import algorithms_for, validate_params
from carrara.training.trainers import TrainedModel, train

# Families searched per task (the autoencoder and the search itself are not candidates).
SEARCHED = (
    "logistic_regression",
    "linear_regression",
    "random_forest",
    "hist_gradient_boosting",
    "lightgbm",
    "xgboost",
)


@dataclass
class Trial:
    number: int
    algorithm: str
    params: dict[str, Any]
    score: float | None  # validation score, higher is better; None if the trial failed
    seconds: float
    error: str | None = None


@dataclass
class SearchResult:
    best: TrainedModel
    best_trial: Trial
    leaderboard: list[Trial]
    metric: str


def _suggest(trial: optuna.Trial, algorithm: str) -> dict[str, Any]:
    if algorithm == "logistic_regression":
        return {"C": trial.suggest_float("C", 1e-3, 1e2, log=True)}
    if algorithm == "linear_regression":
        return {"alpha": trial.suggest_float("alpha", 1e-4, 1e2, log=True)}
    if algorithm == "random_forest":
        return {
            "n_estimators": trial.suggest_int("rf_n_estimators", 50, 300),
            "max_depth": trial.suggest_int("rf_max_depth", 3, 20),
            "min_samples_leaf": trial.suggest_int("rf_min_samples_leaf", 1, 20),
            "max_features": trial.suggest_float("rf_max_features", 0.3, 1.0),
        }
    if algorithm == "hist_gradient_boosting":
        return {
            "learning_rate": trial.suggest_float("hgb_learning_rate", 0.02, 0.3, log=True),
            "max_leaf_nodes": trial.suggest_int("hgb_max_leaf_nodes", 8, 128, log=True),
            "min_samples_leaf": trial.suggest_int("hgb_min_samples_leaf", 5, 100, log=True),
            "l2_regularization": trial.suggest_float("hgb_l2", 1e-6, 10.0, log=True),
        }
    if algorithm == "lightgbm":
        return {
            "n_estimators": trial.suggest_int("lgb_n_estimators", 50, 600),
            "learning_rate": trial.suggest_float("lgb_learning_rate", 0.01, 0.3, log=True),
            "num_leaves": trial.suggest_int("lgb_num_leaves", 8, 128, log=True),
            "min_child_samples": trial.suggest_int("lgb_min_child_samples", 5, 100, log=True),
            "subsample": trial.suggest_float("lgb_subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("lgb_colsample", 0.5, 1.0),
        }
    if algorithm == "xgboost":
        return {
            "n_estimators": trial.suggest_int("xgb_n_estimators", 50, 600),
            "learning_rate": trial.suggest_float("xgb_learning_rate", 0.01, 0.3, log=True),
            "max_depth": trial.suggest_int("xgb_max_depth", 2, 10),
            "subsample": trial.suggest_float("xgb_subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("xgb_colsample", 0.5, 1.0),
        }
    raise ValueError(algorithm)


def validation_score(
    task: str, model: TrainedModel, features: np.ndarray, labels: np.ndarray
) -> tuple[str, float]:
    """(metric, value) to maximise: AUC (binary), -log loss (multiclass), -RMSE (regression)."""
    scores = model.scores(features)
    if task == "binary":
        return "auc", float(roc_auc_score(labels, scores))
    if task == "multiclass":
        classes = list(range(scores.shape[1]))
        return "neg_log_loss", -float(log_loss(labels, scores, labels=classes))
    return "neg_rmse", -float(np.sqrt(mean_squared_error(labels, scores)))


def search(
    task: str,
    params: dict[str, Any],
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    *,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Search within the time budget and trial cap; refit the best candidate on all the data."""
    families = [a for a in algorithms_for(task) if a in SEARCHED]
    seed = int(params.get("seed", 42))
    trials: list[Trial] = []
    metric_name = "score"

    def objective(trial: optuna.Trial) -> float:
        nonlocal metric_name
        algorithm = trial.suggest_categorical("algorithm", families)
        candidate = validate_params(algorithm, task, {**_suggest(trial, algorithm), "seed": seed})
        started = time.monotonic()
        try:
            model = train(algorithm, task, candidate, train_x, train_y)
            metric_name, value = validation_score(task, model, valid_x, valid_y)
        except Exception as exc:  # one failing candidate must not end the search
            record = Trial(
                trial.number,
                algorithm,
                candidate,
                None,
                time.monotonic() - started,
                f"{type(exc).__name__}: {exc}"[:300],
            )
            trials.append(record)
            if on_trial:
                on_trial(record)
            raise optuna.TrialPruned() from exc
        record = Trial(trial.number, algorithm, candidate, value, time.monotonic() - started)
        trials.append(record)
        if on_trial:
            on_trial(record)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=params["max_trials"], timeout=params["time_budget_s"])
    scored = [t for t in trials if t.score is not None]
    if not scored:
        raise RuntimeError("every AutoML candidate failed; see the leaderboard for the reasons")
    leaderboard = sorted(trials, key=lambda t: (t.score is None, -(t.score or 0.0)))
    best_trial = leaderboard[0]
    best = train(
        best_trial.algorithm,
        task,
        best_trial.params,
        np.concatenate([train_x, valid_x]),
        np.concatenate([train_y, valid_y]),
    )
    return SearchResult(
        best=best, best_trial=best_trial, leaderboard=leaderboard, metric=metric_name
    )
