"""Every algorithm family learns learnable data, is deterministic, and exports ONNX with parity."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score, roc_auc_score

from carrara.training.algorithms import validate_params
from carrara.training.automl import search
from carrara.training.onnx_export import PARITY_TOLERANCE, OnnxScorer, export_onnx
from carrara.training.trainers import train

FAST = {
    "random_forest": {"n_estimators": 30},
    "lightgbm": {"n_estimators": 60},
    "xgboost": {"n_estimators": 60},
    "hist_gradient_boosting": {"max_iter": 60},
}


def _data(task: str, n: int = 2400, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    x[rng.random(x.shape) < 0.02] = np.nan  # missing values must be handled
    signal = np.nan_to_num(x[:, 0]) + 0.8 * np.nan_to_num(x[:, 1]) - 0.5 * np.nan_to_num(x[:, 2])
    if task == "binary":
        return x, (signal + rng.normal(scale=0.6, size=n) > 0).astype(np.int64)
    if task == "multiclass":
        return x, np.digitize(signal + rng.normal(scale=0.4, size=n), [-0.7, 0.7])
    return x, 3 * signal + rng.normal(scale=0.5, size=n)


CASES = [
    (task, algorithm)
    for task, algorithms in (
        (
            "binary",
            [
                "logistic_regression",
                "random_forest",
                "hist_gradient_boosting",
                "lightgbm",
                "xgboost",
            ],
        ),
        ("multiclass", ["logistic_regression", "hist_gradient_boosting", "lightgbm", "xgboost"]),
        (
            "regression",
            ["linear_regression", "random_forest", "hist_gradient_boosting", "lightgbm", "xgboost"],
        ),
    )
    for algorithm in algorithms
]


@pytest.mark.parametrize(("task", "algorithm"), CASES)
def test_family_learns_is_deterministic_and_exports_onnx(task: str, algorithm: str) -> None:
    x, y = _data(task)
    params = validate_params(algorithm, task, FAST.get(algorithm, {}))
    model = train(algorithm, task, params, x[:1800], y[:1800])
    scores = model.scores(x[1800:])
    if task == "binary":
        assert roc_auc_score(y[1800:], scores) > 0.8
    elif task == "multiclass":
        assert scores.shape == (600, 3)
        assert float(np.mean(np.argmax(scores, axis=1) == y[1800:])) > 0.6
    else:
        assert r2_score(y[1800:], scores) > 0.7
    again = train(algorithm, task, params, x[:1800], y[:1800])
    np.testing.assert_array_equal(again.scores(x[1800:]), scores)

    exported = export_onnx(model, x[1800:])
    assert exported.skipped_reason is None
    assert exported.model_bytes is not None
    assert exported.max_abs_diff is not None
    assert exported.max_abs_diff <= PARITY_TOLERANCE
    onnx_scores = OnnxScorer(exported.model_bytes, task).scores(x[1800:])
    assert onnx_scores.shape == scores.shape


def test_autoencoder_flags_injected_anomalies_at_the_target_rate() -> None:
    rng = np.random.default_rng(5)
    cov = [[1, 0.9, 0.0], [0.9, 1, 0.0], [0.0, 0.0, 1]]
    normal = rng.multivariate_normal([0, 0, 0], cov, size=3000)
    params = validate_params(
        "autoencoder",
        "anomaly",
        {"hidden_layers": [8, 2, 8], "epochs": 200, "target_alert_rate": 0.02},
    )
    model = train("autoencoder", "anomaly", params, normal, None)
    assert model.threshold is not None
    train_alert_rate = float(np.mean(model.labels(normal)))
    assert train_alert_rate == pytest.approx(0.02, abs=0.005)
    # Anomalies break the learned correlation between the first two features.
    anomalies = rng.multivariate_normal(
        [0, 0, 0], [[1, -0.9, 0], [-0.9, 1, 0], [0, 0, 1]], size=200
    )
    anomalies[:, :2] *= 3
    assert float(np.mean(model.labels(anomalies))) > 0.8
    assert export_onnx(model, normal[:10]).model_bytes is None


def test_automl_search_ranks_trials_and_refits_the_best() -> None:
    x, y = _data("binary", n=1500)
    params = validate_params("auto", "binary", {"time_budget_s": 10, "max_trials": 6})
    seen: list[int] = []
    result = search(
        "binary",
        params,
        x[:900],
        y[:900],
        x[900:1200],
        y[900:1200],
        on_trial=lambda t: seen.append(t.number),
    )
    assert len(result.leaderboard) == len(seen) >= 1
    scores = [t.score for t in result.leaderboard if t.score is not None]
    assert scores == sorted(scores, reverse=True)
    assert result.best_trial is result.leaderboard[0]
    assert result.metric == "auc"
    assert roc_auc_score(y[1200:], result.best.scores(x[1200:])) > 0.8
