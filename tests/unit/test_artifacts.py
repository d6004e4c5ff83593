"""Artifact digests and the formats scorers load without running code (carrara.artifacts)."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
from sklearn.preprocessing import FunctionTransformer

from carrara.artifacts import (
    SKOPS_ALLOWED_TYPES,
    DigestMismatch,
    directory_digests,
    refused_skops_types,
    sha256_bytes,
    sha256_file,
    verify,
    verify_directory,
)
from carrara.scoring.model_card import ModelLoadError
from carrara.scoring.model_loaders import load_serialized
from carrara.training.algorithms import ALGORITHMS, validate_params
from carrara.training.mlflow_logging import UntrustedModelTypes, trusted_skops_types
from carrara.training.trainers import train

SMALL = {"n_estimators": 5, "max_iter": 20, "epochs": 5}


def _data(task: str) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    x[::9, 2] = np.nan
    labels = {
        "binary": (x[:, 0] > 0).astype(np.int64),
        "multiclass": np.digitize(x[:, 0], [-0.5, 0.5]),
        "regression": 2 * x[:, 0],
        "anomaly": None,
    }
    return x, labels[task]


CASES = [(name, task) for name, algo in ALGORITHMS.items() if name != "auto" for task in algo.tasks]


@pytest.mark.parametrize(("algorithm", "task"), CASES)
def test_the_allow_list_covers_every_trainer(algorithm: str, task: str) -> None:
    fields = ALGORITHMS[algorithm].params_model.model_fields
    params = validate_params(algorithm, task, {k: v for k, v in SMALL.items() if k in fields})
    x, y = _data(task)
    trained = train(algorithm, task, params, x, y)
    if trained.flavor == "xgboost":
        return  # XGBoost's native format, never skops
    types = skops.io.get_untrusted_types(data=skops.io.dumps(trained.estimator))
    assert refused_skops_types(types) == []
    assert trusted_skops_types(trained.estimator) == types


def test_the_allow_list_is_exact_names_not_modules() -> None:
    assert "builtins.eval" not in SKOPS_ALLOWED_TYPES
    assert all(t.count(".") >= 1 and not t.endswith(".") for t in SKOPS_ALLOWED_TYPES)
    assert refused_skops_types(["builtins.eval", "numpy.dtype", "sklearn.tree._tree.Tree"]) == [
        "builtins.eval"
    ]


def _double(x: Any) -> Any:
    return x * 2


def test_training_refuses_a_model_with_a_type_outside_the_allow_list() -> None:
    with pytest.raises(UntrustedModelTypes, match=r"test_artifacts\._double"):
        trusted_skops_types(FunctionTransformer(_double))


def test_a_skops_file_with_other_types_loads_only_when_trusted(tmp_path: Path) -> None:
    path = tmp_path / "model.skops"
    skops.io.dump(FunctionTransformer(_double), path)
    with pytest.raises(ModelLoadError, match=r"outside Carrara's allow-list .*_double.*trusted"):
        load_serialized("m/1", path, "skops", trusted_code=False)
    loaded = load_serialized("m/1", path, "skops", trusted_code=True)
    assert loaded.func(3) == 6


def test_an_allowed_skops_file_loads(tmp_path: Path) -> None:
    x, y = _data("binary")
    trained = train(
        "random_forest", "binary", validate_params("random_forest", "binary", SMALL_RF), x, y
    )
    path = tmp_path / "model.skops"
    skops.io.dump(trained.estimator, path)
    loaded = load_serialized("m/1", path, "skops", trusted_code=False)
    np.testing.assert_array_equal(loaded.predict_proba(x), trained.estimator.predict_proba(x))


SMALL_RF = {"n_estimators": 3}


@pytest.mark.parametrize("serialization", ["pickle", "cloudpickle"])
def test_pickles_load_only_when_trusted(tmp_path: Path, serialization: str) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Counter(a=1)))
    with pytest.raises(ModelLoadError, match=rf"refused: the model is a {serialization} file"):
        load_serialized("m/1", path, serialization, trusted_code=False)
    assert load_serialized("m/1", path, serialization, trusted_code=True) == Counter(a=1)


def test_digests_of_a_directory_and_their_checks(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "sub" / "model.onnx").write_bytes(b"\x08\x01")
    pinned = directory_digests(tmp_path)
    assert pinned == {
        "model/MLmodel": sha256_bytes(b"flavors: {}\n"),
        "model/sub/model.onnx": sha256_bytes(b"\x08\x01"),
    }
    assert sha256_file(tmp_path / "MLmodel").startswith("sha256:")
    verify_directory(pinned, tmp_path)

    (tmp_path / "sub" / "model.onnx").write_bytes(b"\x08\x02")
    with pytest.raises(DigestMismatch, match=r"model/sub/model\.onnx changed"):
        verify_directory(pinned, tmp_path)
    (tmp_path / "sub" / "model.onnx").write_bytes(b"\x08\x01")
    (tmp_path / "extra.py").write_text("import os")
    with pytest.raises(DigestMismatch, match=r"model/extra\.py was not pinned"):
        verify_directory(pinned, tmp_path)
    (tmp_path / "extra.py").unlink()
    (tmp_path / "MLmodel").unlink()
    with pytest.raises(DigestMismatch, match="missing: model/MLmodel"):
        verify_directory(pinned, tmp_path)
    with pytest.raises(DigestMismatch, match=r"carrara_model\.json was not pinned"):
        verify(pinned, {"carrara_model.json": sha256_bytes(b"{}")})
