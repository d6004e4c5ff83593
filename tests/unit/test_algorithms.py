"""The algorithm catalogue: which tasks each algorithm trains on, and how its params are checked."""

from __future__ import annotations

from typing import Any

import pytest

from carrara.errors import Invalid
from carrara.training.algorithms import ALGORITHMS, algorithms_for, validate_params


def _invalid(algorithm: str, task: str, params: dict[str, Any]) -> Invalid:
    with pytest.raises(Invalid) as caught:
        validate_params(algorithm, task, params)
    return caught.value


def test_the_catalogue_holds_every_algorithm_the_platform_trains() -> None:
    assert list(ALGORITHMS) == [
        "logistic_regression",
        "linear_regression",
        "random_forest",
        "hist_gradient_boosting",
        "lightgbm",
        "xgboost",
        "autoencoder",
        "auto",
    ]


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (
            "binary",
            [
                "logistic_regression",
                "random_forest",
                "hist_gradient_boosting",
                "lightgbm",
                "xgboost",
                "autoencoder",
                "auto",
            ],
        ),
        (
            "multiclass",
            [
                "logistic_regression",
                "random_forest",
                "hist_gradient_boosting",
                "lightgbm",
                "xgboost",
                "auto",
            ],
        ),
        (
            "regression",
            [
                "linear_regression",
                "random_forest",
                "hist_gradient_boosting",
                "lightgbm",
                "xgboost",
                "auto",
            ],
        ),
        ("anomaly", ["autoencoder"]),
    ],
)
def test_each_task_gets_the_algorithms_that_suit_it(task: str, expected: list[str]) -> None:
    assert algorithms_for(task) == expected


def test_defaults_are_filled_in_so_a_stored_run_is_complete() -> None:
    params = validate_params("logistic_regression", "binary", {"C": 2})
    assert params == {
        "bad_event_threshold": 0.01,
        "seed": 42,
        "C": 2.0,
        "max_iter": 1000,
        "class_weight": None,
    }
    assert isinstance(params["C"], float)


def test_an_unknown_param_is_named_with_the_known_ones() -> None:
    error = _invalid("lightgbm", "binary", {"num_leaf": 8})
    assert error.detail.startswith("params.num_leaf: unknown parameter for lightgbm")
    assert "num_leaves" in error.detail
    assert error.extra["errors"][0]["field"] == "params.num_leaf"


@pytest.mark.parametrize(
    ("algorithm", "task", "params", "field"),
    [
        ("logistic_regression", "binary", {"C": 0}, "params.C"),
        ("logistic_regression", "binary", {"C": float("inf")}, "params.C"),
        ("logistic_regression", "binary", {"max_iter": 0}, "params.max_iter"),
        ("logistic_regression", "binary", {"max_iter": 100_001}, "params.max_iter"),
        ("logistic_regression", "binary", {"class_weight": "skewed"}, "params.class_weight"),
        ("random_forest", "regression", {"n_estimators": 5001}, "params.n_estimators"),
        ("random_forest", "regression", {"max_depth": 0}, "params.max_depth"),
        ("lightgbm", "binary", {"learning_rate": 0}, "params.learning_rate"),
        ("lightgbm", "binary", {"learning_rate": 1.5}, "params.learning_rate"),
        ("lightgbm", "binary", {"num_leaves": 1}, "params.num_leaves"),
        ("lightgbm", "binary", {"num_leaves": 131_073}, "params.num_leaves"),
        ("xgboost", "multiclass", {"max_depth": "deep"}, "params.max_depth"),
        ("autoencoder", "anomaly", {"hidden_layers": []}, "params.hidden_layers"),
        ("autoencoder", "anomaly", {"hidden_layers": [8, 0]}, "params.hidden_layers.1"),
        ("autoencoder", "anomaly", {"target_alert_rate": 0}, "params.target_alert_rate"),
        ("autoencoder", "anomaly", {"target_alert_rate": 0.51}, "params.target_alert_rate"),
        ("auto", "regression", {"time_budget_s": 9}, "params.time_budget_s"),
        ("auto", "regression", {"time_budget_s": 86_401}, "params.time_budget_s"),
        (
            "hist_gradient_boosting",
            "binary",
            {"bad_event_threshold": 1.1},
            "params.bad_event_threshold",
        ),
        ("hist_gradient_boosting", "binary", {"seed": -1}, "params.seed"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_param(
    algorithm: str, task: str, params: dict[str, Any], field: str
) -> None:
    error = _invalid(algorithm, task, params)
    assert [e["field"] for e in error.extra["errors"]] == [field]
    assert error.detail.startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("algorithm", "task", "params"),
    [
        ("lightgbm", "binary", {"num_leaves": 2, "learning_rate": 1}),
        ("lightgbm", "binary", {"num_leaves": 131_072}),
        ("autoencoder", "anomaly", {"hidden_layers": [64, 16, 64], "target_alert_rate": 0.5}),
        ("autoencoder", "binary", {}),
        ("auto", "multiclass", {"time_budget_s": 10}),
        ("auto", "regression", {"time_budget_s": 86_400}),
        ("linear_regression", "regression", {"alpha": 0.5, "bad_event_threshold": 0}),
    ],
)
def test_values_on_the_bounds_are_accepted(
    algorithm: str, task: str, params: dict[str, Any]
) -> None:
    validated = validate_params(algorithm, task, params)
    assert all(validated[k] == v for k, v in params.items())


@pytest.mark.parametrize(
    ("algorithm", "task"),
    [
        ("linear_regression", "binary"),
        ("logistic_regression", "regression"),
        ("autoencoder", "regression"),
        ("auto", "anomaly"),
        ("xgboost", "anomaly"),
    ],
)
def test_an_algorithm_unsuited_to_the_dataset_task_is_refused(algorithm: str, task: str) -> None:
    error = _invalid(algorithm, task, {})
    assert f"algorithm {algorithm!r} cannot train on a {task} dataset" in error.detail
    assert f"algorithms for {task}: {', '.join(algorithms_for(task))}" in error.detail


def test_an_unknown_algorithm_lists_the_known_ones() -> None:
    error = _invalid("deep_magic", "binary", {})
    assert (
        error.detail == f"unknown algorithm 'deep_magic'; known algorithms: {', '.join(ALGORITHMS)}"
    )


def test_an_unknown_task_is_refused() -> None:
    assert "unknown dataset task 'ranking'" in _invalid("auto", "ranking", {}).detail


def test_every_params_schema_forbids_unknown_params_and_shows_the_common_ones() -> None:
    for algorithm in ALGORITHMS.values():
        schema = algorithm.params_schema()
        assert schema["additionalProperties"] is False
        assert {"bad_event_threshold", "seed"} <= set(schema["properties"])
    lightgbm = ALGORITHMS["lightgbm"].params_schema()["properties"]["num_leaves"]
    assert (lightgbm["minimum"], lightgbm["maximum"], lightgbm["default"]) == (2, 131_072, 31)
