"""Holdout metrics and their baselines against values computed by hand on tiny arrays."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from carrara.training.evaluation import (
    anomaly_metrics,
    binary_metrics,
    evaluate,
    multiclass_metrics,
    regression_metrics,
)

Y = [0, 0, 1, 1]
P = [0.1, 0.4, 0.35, 0.8]


def test_binary_metrics_and_the_prior_baseline() -> None:
    m = binary_metrics(Y, P, y_train=[0, 0, 0, 1])
    assert m["holdout_rows"] == 4
    assert m["positive_rate"] == 0.5
    assert m["auc"] == 0.75  # 3 of 4 (positive, negative) pairs ranked right
    assert m["log_loss"] == pytest.approx(
        -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    )
    assert m["accuracy"] == 0.75  # predictions at 0.5: 0 0 0 1
    assert m["precision"] == 1.0
    assert m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)
    # Baseline: the training prior 0.25 as score, so always the majority class 0.
    assert m["baseline_auc"] == 0.5
    assert m["baseline_log_loss"] == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)
    assert m["baseline_accuracy"] == 0.5
    assert m["baseline_precision"] == 0.0
    assert m["baseline_recall"] == 0.0
    assert m["baseline_f1"] == 0.0


def test_binary_baseline_from_the_holdout_without_training_labels() -> None:
    m = binary_metrics(Y, P)
    assert m["baseline_log_loss"] == pytest.approx(math.log(2))
    assert m["baseline_accuracy"] == 0.5  # prior 0.5 predicts the positive class
    assert m["baseline_recall"] == 1.0


def test_a_holdout_with_one_class_has_no_auc_but_other_metrics() -> None:
    m = binary_metrics([1, 1], [0.7, 0.9], y_train=[0, 1])
    assert m["auc"] is None
    assert m["baseline_auc"] is None
    assert m["accuracy"] == 1.0
    assert m["recall"] == 1.0
    assert m["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.9)) / 2)


def test_multiclass_macro_metrics_and_one_vs_rest_auc() -> None:
    y = [0, 1, 2, 2]
    proba = [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]
    m = multiclass_metrics(y, proba, y_train=[0, 0, 0, 1, 2])
    assert m["classes"] == 3
    assert m["accuracy"] == 0.75  # predicted 0 1 1 2
    assert m["recall_macro"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["log_loss"] == pytest.approx(
        -(math.log(0.7) + math.log(0.4) + math.log(0.3) + math.log(0.8)) / 4
    )
    assert m["auc_ovr"] == pytest.approx((1.0 + 2 / 3 + 0.875) / 3)
    # Baseline: prior [0.6, 0.2, 0.2], always class 0.
    assert m["baseline_accuracy"] == 0.25
    assert m["baseline_recall_macro"] == pytest.approx(1 / 3)
    assert m["baseline_auc_ovr"] == 0.5
    assert m["baseline_log_loss"] == pytest.approx(-(math.log(0.6) + 3 * math.log(0.2)) / 4)


def test_multiclass_with_one_class_in_the_holdout() -> None:
    m = multiclass_metrics([2, 2], [[0.1, 0.1, 0.8], [0.5, 0.2, 0.3]], y_train=[0, 1, 2])
    assert m["auc_ovr"] is None
    assert m["accuracy"] == 0.5
    assert m["recall_macro"] == 0.5  # over the classes present in the holdout


def test_regression_metrics_and_the_mean_baseline() -> None:
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 5], y_train=[2, 2])
    assert m["rmse"] == 0.5
    assert m["mae"] == 0.25
    assert m["r2"] == pytest.approx(0.8)  # 1 - 1 / 5
    assert m["baseline_rmse"] == pytest.approx(math.sqrt(1.5))
    assert m["baseline_mae"] == 1.0
    assert m["baseline_r2"] == pytest.approx(-0.2)
    constant = regression_metrics([3, 3], [3, 4])
    assert constant["r2"] is None
    assert constant["baseline_r2"] is None
    assert constant["mae"] == 0.5


def test_anomaly_precision_recall_at_the_threshold_on_labeled_rows() -> None:
    scores = [0.1, 0.9, 0.5, 0.7, 0.2]
    m = anomaly_metrics([0, 1, math.nan, 0, 1], scores, threshold=0.6)
    assert m["alert_rate"] == 0.4
    assert m["labeled_rows"] == 4
    assert m["anomaly_rate"] == 0.5
    assert m["precision"] == 0.5
    assert m["recall"] == 0.5
    assert m["f1"] == 0.5
    assert m["auc"] == 0.75
    # Random alerts at the same rate: precision = anomaly rate, recall = alert rate.
    assert m["baseline_precision"] == 0.5
    assert m["baseline_recall"] == 0.5
    assert m["baseline_auc"] == 0.5
    unlabeled = anomaly_metrics(None, scores, threshold=0.6)
    assert unlabeled == {"holdout_rows": 5, "alert_rate": 0.4, "threshold": 0.6}
    none_labeled = anomaly_metrics([math.nan] * 5, scores, threshold=0.6)
    assert none_labeled["precision"] is None
    assert none_labeled["labeled_rows"] == 0


def test_evaluate_dispatches_by_task_and_an_empty_holdout_gives_none() -> None:
    assert evaluate("binary", Y, P)["auc"] == 0.75
    assert evaluate("regression", [1, 2], [1, 2])["rmse"] == 0.0
    empty = evaluate("binary", [], [])
    assert empty["holdout_rows"] == 0
    assert empty["auc"] is None
    assert empty["baseline_accuracy"] is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: binary_metrics([0, 1], [0.5]), "rows"),
        (lambda: binary_metrics([0, 2], [0.5, 0.5]), "0 or 1"),
        (lambda: binary_metrics([0, 1], [0.5, math.nan]), "NaN"),
        (lambda: multiclass_metrics([0, 3], [[0.5, 0.5], [0.5, 0.5]]), r"\[0, 2\)"),
        (lambda: regression_metrics([1, math.inf], [1, 2]), "NaN or infinite"),
        (lambda: anomaly_metrics([0, 2], [0.1, 0.2], threshold=0.5), "anomaly labels"),
    ],
)
def test_inconsistent_inputs_raise_clear_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
