"""Holdout metrics, each next to a baseline computed on the same holdout.

A metric alone says little; next to what a model without features scores it says whether the
model learned anything. The baselines are fitted on the training labels when given (as a
`DummyClassifier`/`DummyRegressor` would be), else on the holdout's own labels:
- classification: the prior class probabilities as scores, the majority class as prediction;
- regression: the mean as prediction;
- anomaly detection: alerts at random at the model's alert rate, whose expected precision is the
  anomaly rate and expected recall the alert rate.

Every function returns a flat `{name: value}` dict with `baseline_<name>` beside each metric; a
metric that is undefined on this holdout (AUC with one class, R^2 of a constant) is None, never
an exception or a NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
    root_mean_squared_error,
)

from carrara.streams.event_schema import Task

# An undefined precision, recall or F1 (nothing predicted or nothing true) counts as 0, silently.
# sklearn's metrics are unannotated: a type checker reads `str` from their "warn" default.
_ZERO_DIVISION: Any = 0

Metrics = dict[str, float | int | None]
# Probabilities are clipped here for the baseline's log loss: a class absent from the training
# labels has prior 0, which would make the log loss infinite.
_EPS = 1e-15


def evaluate(
    task: Task | str,
    y_true: Any,
    y_score: Any,
    *,
    y_train: Any = None,
    threshold: float = 0.5,
) -> Metrics:
    """Holdout metrics and baselines for `task`.

    `y_score`: binary -> probability of the positive class (n,); multiclass -> class
    probabilities (n, classes); regression -> predictions (n,); anomaly -> anomaly scores (n,),
    alerting at `score >= threshold` (`y_true` may be None or NaN where unlabeled).
    """
    task = Task(task)
    if task is Task.binary:
        return binary_metrics(y_true, y_score, y_train=y_train, threshold=threshold)
    if task is Task.multiclass:
        return multiclass_metrics(y_true, y_score, y_train=y_train)
    if task is Task.regression:
        return regression_metrics(y_true, y_score, y_train=y_train)
    return anomaly_metrics(y_true, y_score, threshold=threshold)


def _vectors(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(y_true)
    score = np.asarray(y_score, dtype=np.float64)
    if true.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {true.shape}")
    if len(score) != len(true):
        raise ValueError(f"y_true has {len(true)} rows but the scores have {len(score)}")
    if not np.isfinite(score).all():
        raise ValueError("the scores contain NaN or infinite values")
    return true, score


def _f(value: Any) -> float:
    return float(value)


def _auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(y_true)) < 2:
        return None  # undefined with a single class
    return _f(roc_auc_score(y_true, score))


def _empty(names: list[str], rows: int = 0) -> Metrics:
    metrics: Metrics = {"holdout_rows": rows}
    for name in names:
        metrics[name] = None
        metrics[f"baseline_{name}"] = None
    return metrics


BINARY_METRICS = ["auc", "log_loss", "accuracy", "f1", "precision", "recall"]


def binary_metrics(
    y_true: Any, y_score: Any, *, y_train: Any = None, threshold: float = 0.5
) -> Metrics:
    """AUC, log loss, accuracy, F1, precision, recall of 0/1 labels vs positive-class scores."""
    true, score = _vectors(y_true, y_score)
    if len(true) == 0:
        return _empty(BINARY_METRICS)
    true = true.astype(np.int64)
    if not np.isin(true, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    reference = true if y_train is None else np.asarray(y_train, dtype=np.int64)
    prior = float(np.mean(reference)) if len(reference) else 0.5
    metrics: Metrics = {"holdout_rows": len(true), "positive_rate": _f(true.mean())}
    metrics.update(_binary(true, score, threshold))
    baseline = _binary(true, np.full(len(true), np.clip(prior, _EPS, 1 - _EPS)), 0.5)
    metrics.update({f"baseline_{name}": value for name, value in baseline.items()})
    return metrics


def _binary(true: np.ndarray, score: np.ndarray, threshold: float) -> Metrics:
    predicted = (score >= threshold).astype(np.int64)
    return {
        "auc": _auc(true, score),
        "log_loss": _f(log_loss(true, np.clip(score, 0.0, 1.0), labels=[0, 1])),
        "accuracy": _f(accuracy_score(true, predicted)),
        "f1": _f(f1_score(true, predicted, zero_division=_ZERO_DIVISION)),
        "precision": _f(precision_score(true, predicted, zero_division=_ZERO_DIVISION)),
        "recall": _f(recall_score(true, predicted, zero_division=_ZERO_DIVISION)),
    }


MULTICLASS_METRICS = [
    "auc_ovr",
    "log_loss",
    "accuracy",
    "f1_macro",
    "precision_macro",
    "recall_macro",
]


def multiclass_metrics(y_true: Any, proba: Any, *, y_train: Any = None) -> Metrics:
    """Accuracy, log loss, macro F1/precision/recall and one-vs-rest macro AUC of class codes.

    `proba[:, k]` is the probability of class code `k`; macro averages run over the classes
    present in the holdout, and the AUC over those with both positives and negatives.
    """
    scores = np.asarray(proba, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"multiclass scores must be (rows, classes), got shape {scores.shape}")
    true = np.asarray(y_true)
    if true.ndim != 1 or len(true) != len(scores):
        raise ValueError(f"y_true must have one label per row of the scores ({len(scores)})")
    if len(true) == 0:
        return _empty(MULTICLASS_METRICS)
    if not np.isfinite(scores).all():
        raise ValueError("the scores contain NaN or infinite values")
    classes = scores.shape[1]
    true = true.astype(np.int64)
    if true.min() < 0 or true.max() >= classes:
        raise ValueError(f"class codes must be in [0, {classes}) to match the score columns")
    reference = true if y_train is None else np.asarray(y_train, dtype=np.int64)
    prior = np.bincount(reference, minlength=classes)[:classes].astype(np.float64)
    prior = prior / prior.sum() if prior.sum() else np.full(classes, 1.0 / classes)
    metrics: Metrics = {"holdout_rows": len(true), "classes": classes}
    metrics.update(_multiclass(true, scores))
    baseline_scores = np.tile(np.clip(prior, _EPS, 1.0), (len(true), 1))
    baseline_scores /= baseline_scores.sum(axis=1, keepdims=True)
    baseline = _multiclass(true, baseline_scores)
    metrics.update({f"baseline_{name}": value for name, value in baseline.items()})
    return metrics


def _multiclass(true: np.ndarray, scores: np.ndarray) -> Metrics:
    classes = scores.shape[1]
    predicted = scores.argmax(axis=1)
    present = np.unique(true)
    aucs = [
        _f(roc_auc_score(true == k, scores[:, k]))
        for k in present
        if 0 < np.count_nonzero(true == k) < len(true)
    ]
    return {
        "auc_ovr": float(np.mean(aucs)) if aucs else None,
        "log_loss": _f(log_loss(true, scores, labels=list(range(classes)))),
        "accuracy": _f(accuracy_score(true, predicted)),
        "f1_macro": _f(
            f1_score(true, predicted, labels=present, average="macro", zero_division=_ZERO_DIVISION)
        ),
        "precision_macro": _f(
            precision_score(
                true, predicted, labels=present, average="macro", zero_division=_ZERO_DIVISION
            )
        ),
        "recall_macro": _f(
            recall_score(
                true, predicted, labels=present, average="macro", zero_division=_ZERO_DIVISION
            )
        ),
    }


REGRESSION_METRICS = ["rmse", "mae", "r2"]


def regression_metrics(y_true: Any, y_pred: Any, *, y_train: Any = None) -> Metrics:
    """RMSE, MAE and R^2 of predictions, against predicting the (training) mean."""
    true, predicted = _vectors(np.asarray(y_true, dtype=np.float64), y_pred)
    if len(true) == 0:
        return _empty(REGRESSION_METRICS)
    if not np.isfinite(true).all():
        raise ValueError("the regression targets contain NaN or infinite values")
    reference = true if y_train is None else np.asarray(y_train, dtype=np.float64)
    mean = float(np.mean(reference)) if len(reference) else 0.0
    metrics: Metrics = {"holdout_rows": len(true)}
    metrics.update(_regression(true, predicted))
    baseline = _regression(true, np.full(len(true), mean))
    metrics.update({f"baseline_{name}": value for name, value in baseline.items()})
    return metrics


def _regression(true: np.ndarray, predicted: np.ndarray) -> Metrics:
    # R^2 compares with the holdout's own variance: undefined for fewer than 2 rows or a
    # constant target (scikit-learn would answer a made-up 0 or 1).
    defined = len(true) >= 2 and bool(np.ptp(true) > 0)
    return {
        "rmse": _f(root_mean_squared_error(true, predicted)),
        "mae": _f(mean_absolute_error(true, predicted)),
        "r2": _f(r2_score(true, predicted)) if defined else None,
    }


ANOMALY_METRICS = ["precision", "recall", "f1", "auc"]


def anomaly_metrics(y_true: Any, scores: Any, *, threshold: float) -> Metrics:
    """Alert rate at `threshold` (alert = score >= threshold) and, on the labeled rows (1 =
    anomaly; NaN or None = unlabeled), precision, recall, F1 and AUC of the scores."""
    score = np.asarray(scores, dtype=np.float64)
    if score.ndim != 1:
        raise ValueError(f"anomaly scores must be one-dimensional, got shape {score.shape}")
    if not np.isfinite(score).all():
        raise ValueError("the scores contain NaN or infinite values")
    alerts = score >= threshold
    metrics: Metrics = {
        "holdout_rows": len(score),
        "alert_rate": _f(alerts.mean()) if len(score) else None,
        "threshold": _f(threshold),
    }
    if y_true is None:
        return metrics
    labels = np.asarray(y_true, dtype=np.float64)
    if labels.shape != score.shape:
        raise ValueError(f"y_true has {len(labels)} rows but the scores have {len(score)}")
    labeled = ~np.isnan(labels)
    true = labels[labeled].astype(np.int64)
    if not np.isin(true, (0, 1)).all():
        raise ValueError("anomaly labels must be 1 (anomaly), 0 (normal) or NaN (unlabeled)")
    metrics["labeled_rows"] = len(true)
    if len(true) == 0:
        metrics.update(_empty(ANOMALY_METRICS, len(score)))
        return metrics
    flagged = alerts[labeled].astype(np.int64)
    anomaly_rate = _f(true.mean())
    alert_rate = _f(flagged.mean())
    precision = _f(precision_score(true, flagged, zero_division=_ZERO_DIVISION))
    recall = _f(recall_score(true, flagged, zero_division=_ZERO_DIVISION))
    # Random alerts at the same rate: expected precision = anomaly rate, recall = alert rate.
    baseline_precision, baseline_recall = anomaly_rate, alert_rate
    baseline_f1 = (
        2 * baseline_precision * baseline_recall / (baseline_precision + baseline_recall)
        if baseline_precision + baseline_recall > 0
        else 0.0
    )
    auc = _auc(true, score[labeled])
    metrics.update(
        {
            "anomaly_rate": anomaly_rate,
            "precision": precision,
            "baseline_precision": baseline_precision,
            "recall": recall,
            "baseline_recall": baseline_recall,
            "f1": _f(f1_score(true, flagged, zero_division=_ZERO_DIVISION)),
            "baseline_f1": baseline_f1,
            "auc": auc,
            "baseline_auc": None if auc is None else 0.5,
        }
    )
    return metrics
