"""Validation, labels and model-card parsing of the scorer's model runtime (no services)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from carrara.scoring.model_card import (
    LoadedModel,
    ModelLoadError,
    ModelValidationError,
    class_labels,
    parse_card,
)
from carrara.scoring.model_runtime import validate

SPEC = {
    "format": 1,
    "schema": {
        "key_field": "id",
        "event_time_field": None,
        "label_field": "y",
        "task": "multiclass",
        "features": [{"name": "a", "type": "float"}, {"name": "b", "type": "float"}],
    },
    "columns": ["a", "b"],
    "vocabularies": {},
    "label_classes": ["high", "low", "mid"],
}
CARD = {
    "format": 1,
    "algorithm": "lightgbm",
    "task": "multiclass",
    "flavor": "lightgbm",
    "feature_names": ["a", "b"],
    "feature_spec": SPEC,
    "classes": [0, 1, 2],
    "threshold": None,
}


def _model(
    task: str,
    scorer: Callable[[np.ndarray], np.ndarray],
    *,
    classes: list[Any] | None = None,
    threshold: float | None = None,
    width: int | None = None,
    example: np.ndarray | None = None,
    spec: dict[str, Any] | None = None,
) -> LoadedModel:
    return LoadedModel(
        model_name="m",
        version=3,
        runtime="native",
        task=task,  # type: ignore[arg-type]
        algorithm="test",
        feature_names=["a", "b"],
        feature_spec=spec,
        classes=classes,
        threshold=threshold,
        load_seconds=0.1,
        input_example=example,
        model_width=width,
        scorer=scorer,
    )


def test_labels_follow_the_task() -> None:
    binary = _model("binary", lambda x: x[:, 0], classes=["ok", "fraud"])
    assert binary.labels(np.array([0.2, 0.5, 0.9])) == ["ok", "fraud", "fraud"]
    multi = _model("multiclass", lambda x: x, classes=["high", "low", "mid"])
    assert multi.labels(np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])) == ["mid", "high"]
    anomaly = _model("anomaly", lambda x: x[:, 0], threshold=1.5)
    assert anomaly.labels(np.array([1.0, 1.5, 2.0])) == [False, False, True]
    regression = _model("regression", lambda x: x[:, 0])
    assert regression.labels(np.array([1.0, 2.0])) == [None, None]


def test_a_card_maps_class_codes_through_the_spec_labels() -> None:
    card = parse_card("m/1", orjson.dumps(CARD))
    assert class_labels(card) == ["high", "low", "mid"]
    # A class seen only in the holdout: the model's columns are codes 0 and 2.
    assert class_labels(parse_card("m/1", orjson.dumps({**CARD, "classes": [0, 2]}))) == [
        "high",
        "mid",
    ]
    binary_spec = {**SPEC, "label_classes": ["ok", "fraud"]}
    binary = {**CARD, "task": "binary", "classes": [0, 1], "feature_spec": binary_spec}
    assert class_labels(parse_card("m/1", orjson.dumps(binary))) == ["ok", "fraud"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "unsupported model card format 2"),
        ({"task": "ranking"}, r"Invalid enum value 'ranking' - at `\$.task`"),
        ({"feature_names": []}, "lists no features"),
        ({"task": "anomaly", "threshold": None}, "has no threshold"),
        ({"feature_names": ["b", "a"]}, r"feature spec's columns \['a', 'b'\] differ"),
        ({"feature_spec": {**SPEC, "format": 9}}, "unsupported feature spec format 9"),
    ],
)
def test_a_bad_card_is_refused_with_the_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_card("m/1", orjson.dumps({**CARD, **change}))


def test_validation_accepts_a_well_behaved_model() -> None:
    example = np.array([[0.1, 0.2], [0.3, 0.4]])
    model = _model(
        "binary",
        lambda x: np.full(len(x), 0.3),
        classes=["ok", "fraud"],
        width=2,
        example=example,
        spec=SPEC,
    )
    validate(model)


def _failing(x: np.ndarray) -> np.ndarray:
    raise ValueError("X has 2 features, but the model is expecting 3")


@pytest.mark.parametrize(
    ("task", "scorer", "kwargs", "message"),
    [
        (
            "binary",
            lambda x: np.zeros(len(x)),
            {"width": 3},
            "takes 3 features but its card lists 2",
        ),
        (
            "binary",
            lambda x: np.zeros(len(x)),
            {"example": np.zeros((2, 3))},
            r"input example has shape \(2, 3\)",
        ),
        ("binary", _failing, {}, "scoring 1 example rows failed: ValueError: X has 2 features"),
        ("binary", lambda x: np.zeros((len(x), 2)), {}, r"must score \(1,\), got shape \(1, 2\)"),
        ("regression", lambda x: np.full(len(x), np.nan), {}, "not all finite"),
        ("binary", lambda x: np.full(len(x), 1.5), {}, r"probabilities outside \[0, 1\]"),
        (
            "multiclass",
            lambda x: np.full((len(x), 3), 0.5),
            {"classes": ["a", "b", "c"]},
            "do not sum to 1",
        ),
        (
            "multiclass",
            lambda x: np.full((len(x), 2), 0.5),
            {"classes": ["a", "b", "c"]},
            r"must score \(1, 3\)",
        ),
    ],
)
def test_validation_refuses_with_the_reason(
    task: str,
    scorer: Callable[[np.ndarray], np.ndarray],
    kwargs: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ModelValidationError, match=message):
        validate(_model(task, scorer, **kwargs))


def test_card_models_must_score_missing_values() -> None:
    def no_nan(x: np.ndarray) -> np.ndarray:
        if np.isnan(x).any():
            raise ValueError("Input contains NaN")
        return np.zeros(len(x))

    validate(_model("regression", no_nan, example=np.ones((2, 2))))  # no card: not required
    with pytest.raises(ModelValidationError, match="Input contains NaN"):
        validate(_model("regression", no_nan, example=np.ones((2, 2)), spec=SPEC))
