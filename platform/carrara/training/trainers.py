"""Trainers per algorithm family: validated params in, a fitted model with one scoring contract out.

Every trained model answers `scores(X)` the same way, whatever the library underneath:
binary -> P(positive class) per row; multiclass -> one probability column per class; regression ->
the prediction; anomaly -> the reconstruction error (alert when above `threshold`). Evaluation,
ONNX parity checks and (later) the scorer all rely on that contract.

Missing values arrive as NaN. The boosting libraries and HistGradientBoosting handle NaN natively;
the linear models, random forests and the autoencoder get a median imputer in their pipeline (and
standard scaling where the optimiser needs it), so the artifact carries its own preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

Flavor = Literal["sklearn", "lightgbm", "xgboost"]


@dataclass
class TrainedModel:
    """A fitted model and what is needed to score with it consistently."""

    algorithm: str
    task: str
    estimator: Any
    flavor: Flavor
    n_features: int
    classes: list[Any] | None = None
    # Anomaly detection: alert when the reconstruction error exceeds this.
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Scores per the contract in the module docstring."""
        if self.task == "anomaly" or self.algorithm == "autoencoder":
            return reconstruction_error(self.estimator, features)
        if self.task == "regression":
            return np.asarray(self.estimator.predict(features), dtype=np.float64)
        proba = np.asarray(self.estimator.predict_proba(features), dtype=np.float64)
        return proba[:, 1] if self.task == "binary" else proba

    def labels(self, features: np.ndarray) -> np.ndarray:
        """Predicted class codes (classification) or alert flags (anomaly)."""
        scores = self.scores(features)
        if self.algorithm == "autoencoder":
            assert self.threshold is not None
            return (scores > self.threshold).astype(np.int64)
        if self.task == "binary":
            return (scores >= 0.5).astype(np.int64)
        if self.task == "multiclass":
            return np.argmax(scores, axis=1)
        return scores

    def feature_importances(self) -> np.ndarray | None:
        """Importance per input column where the family defines one (normalised to sum 1)."""
        final: Any = self.estimator[-1] if isinstance(self.estimator, Pipeline) else self.estimator
        values = getattr(final, "feature_importances_", None)
        if values is None and hasattr(final, "coef_"):
            values = np.abs(np.atleast_2d(final.coef_)).mean(axis=0)
        if values is None:
            return None
        values = np.asarray(values, dtype=np.float64)
        total = values.sum()
        return values / total if total > 0 else values


def reconstruction_error(pipeline: Pipeline, features: np.ndarray) -> np.ndarray:
    """Mean squared error between the scaled input and the autoencoder's reconstruction."""
    prepared = pipeline[:-1].transform(features)
    reconstructed = pipeline[-1].predict(prepared)
    return np.mean((np.asarray(reconstructed) - prepared) ** 2, axis=1)


def _imputed(*steps: Any) -> Pipeline:
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), *steps)


def _classification(task: str) -> bool:
    return task in ("binary", "multiclass")


def build_estimator(algorithm: str, task: str, params: dict[str, Any]) -> tuple[Any, Flavor]:
    """An unfitted estimator for `algorithm` with validated `params` (see algorithms.py)."""
    seed = int(params.get("seed", 42))
    classify = _classification(task)
    if algorithm == "logistic_regression":
        model = LogisticRegression(
            C=params["C"],
            max_iter=params["max_iter"],
            class_weight=params.get("class_weight"),
            random_state=seed,
        )
        return _imputed(StandardScaler(), model), "sklearn"
    if algorithm == "linear_regression":
        model = Ridge(alpha=params["alpha"], fit_intercept=params["fit_intercept"])
        return _imputed(StandardScaler(), model), "sklearn"
    if algorithm == "random_forest":
        common = {
            "n_estimators": params["n_estimators"],
            "max_depth": params["max_depth"],
            "min_samples_leaf": params["min_samples_leaf"],
            "max_features": params["max_features"],
            "random_state": seed,
            "n_jobs": 1,
        }
        forest = (
            RandomForestClassifier(class_weight=params.get("class_weight"), **common)
            if classify
            else RandomForestRegressor(**common)
        )
        return _imputed(forest), "sklearn"
    if algorithm == "hist_gradient_boosting":
        common = {
            "max_iter": params["max_iter"],
            "learning_rate": params["learning_rate"],
            "max_depth": params["max_depth"],
            "max_leaf_nodes": params["max_leaf_nodes"],
            "min_samples_leaf": params["min_samples_leaf"],
            "l2_regularization": params["l2_regularization"],
            "early_stopping": params["early_stopping"],
            "random_state": seed,
        }
        cls = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        return cls(**common), "sklearn"
    if algorithm == "lightgbm":
        import lightgbm as lgb

        common = {
            "n_estimators": params["n_estimators"],
            "learning_rate": params["learning_rate"],
            "num_leaves": params["num_leaves"],
            "max_depth": params["max_depth"] or -1,
            "min_child_samples": params["min_child_samples"],
            "subsample": params["subsample"],
            "subsample_freq": 1 if params["subsample"] < 1 else 0,
            "colsample_bytree": params["colsample_bytree"],
            "reg_lambda": params["reg_lambda"],
            "random_state": seed,
            "n_jobs": 1,
            "deterministic": True,
            "verbose": -1,
        }
        cls = lgb.LGBMClassifier if classify else lgb.LGBMRegressor
        return cls(**common), "lightgbm"
    if algorithm == "xgboost":
        import xgboost as xgb

        common = {
            "n_estimators": params["n_estimators"],
            "learning_rate": params["learning_rate"],
            "max_depth": params["max_depth"],
            "min_child_weight": params["min_child_weight"],
            "subsample": params["subsample"],
            "colsample_bytree": params["colsample_bytree"],
            "reg_lambda": params["reg_lambda"],
            "random_state": seed,
            "n_jobs": 1,
            "tree_method": "hist",
        }
        cls = xgb.XGBClassifier if classify else xgb.XGBRegressor
        return cls(**common), "xgboost"
    if algorithm == "autoencoder":
        mlp = MLPRegressor(
            hidden_layer_sizes=tuple(params["hidden_layers"]),
            max_iter=params["epochs"],
            batch_size=params["batch_size"],
            learning_rate_init=params["learning_rate"],
            random_state=seed,
            early_stopping=False,
        )
        return _imputed(StandardScaler(), mlp), "sklearn"
    raise ValueError(f"no trainer for algorithm {algorithm!r}")


def train(
    algorithm: str,
    task: str,
    params: dict[str, Any],
    features: np.ndarray,
    labels: np.ndarray | None,
) -> TrainedModel:
    """Fit `algorithm` on the training split. Deterministic for the same inputs and seed."""
    if algorithm == "auto":
        raise ValueError("`auto` is a search, not a trainer: use training.automl.search")
    estimator, flavor = build_estimator(algorithm, task, params)
    if algorithm == "autoencoder":
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        prepare = estimator[:-1]
        prepared = prepare.fit_transform(features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator[-1].fit(prepared, prepared)
        errors = reconstruction_error(estimator, features)
        threshold = float(np.quantile(errors, 1.0 - params["target_alert_rate"]))
        return TrainedModel(
            algorithm, task, estimator, flavor, features.shape[1], threshold=threshold
        )
    if labels is None:
        raise ValueError(f"{algorithm} needs labels")
    estimator.fit(features, labels)
    classes = [c.item() if hasattr(c, "item") else c for c in getattr(estimator, "classes_", [])]
    return TrainedModel(
        algorithm, task, estimator, flavor, features.shape[1], classes=classes or None
    )
