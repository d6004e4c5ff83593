"""The scorer's model runtime against the real MLflow server: load, validate, score, cache.

Models are trained, exported and registered exactly as training runs do (trainers, onnx_export,
mlflow_logging), then loaded back through the registry over HTTP and compared with the scores the
training process computed.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from carrara.scoring.model_runtime import (
    ModelCache,
    ModelLoadError,
    ModelValidationError,
    load_model_version,
    validate,
)
from carrara.settings import Settings
from carrara.streams.event_codec import FeatureSpec
from carrara.streams.event_schema import EventSchema, Feature, FeatureType, Task
from carrara.training.algorithms import validate_params
from carrara.training.mlflow_logging import (
    Lineage,
    LoggedModel,
    log_and_register,
    model_card,
)
from carrara.training.onnx_export import OnnxExport, export_onnx
from carrara.training.trainers import TrainedModel, train

PREFIX = f"test-runtime-{uuid.uuid4().hex[:8]}"
WIDTH = 6
LABELS = {"binary": ["ok", "fraud"], "multiclass": ["high", "low", "mid"]}
# (case, algorithm, task, params): small models, so the file stays fast.
CASES = [
    ("lr", "logistic_regression", "binary", {}),
    ("lgbm", "lightgbm", "binary", {"n_estimators": 30}),
    ("xgb", "xgboost", "binary", {"n_estimators": 30}),
    ("hgb", "hist_gradient_boosting", "binary", {"max_iter": 30}),
    ("multiclass", "lightgbm", "multiclass", {"n_estimators": 30}),
    ("regression", "hist_gradient_boosting", "regression", {"max_iter": 30}),
    ("autoencoder", "autoencoder", "anomaly", {"hidden_layers": [8, 3, 8], "epochs": 60}),
]


@dataclass(frozen=True)
class Registered:
    trained: TrainedModel
    logged: LoggedModel
    spec: FeatureSpec
    holdout: np.ndarray


def _data(task: str, n: int = 800, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, WIDTH))
    x[rng.random(x.shape) < 0.02] = np.nan  # live events have missing values too
    signal = np.nan_to_num(x[:, 0]) + 0.8 * np.nan_to_num(x[:, 1]) - 0.5 * np.nan_to_num(x[:, 2])
    if task == "binary":
        return x, (signal + rng.normal(scale=0.6, size=n) > 0).astype(np.int64)
    if task == "multiclass":
        return x, np.digitize(signal + rng.normal(scale=0.4, size=n), [-0.7, 0.7])
    return x, 3 * signal + rng.normal(scale=0.5, size=n)


def _spec(task: str, width: int = WIDTH) -> FeatureSpec:
    schema = EventSchema(
        key_field="id",
        features=tuple(Feature(f"f{i}", FeatureType.float) for i in range(width)),
        task=Task(task),
        label_field=None if task == "anomaly" else "y",
    )
    return FeatureSpec(schema, {}, LABELS.get(task))


def _register(
    settings: Settings, name: str, algorithm: str, task: str, params: dict[str, Any], onnx: bool
) -> Registered:
    x, y = _data(task)
    checked = validate_params(algorithm, task, params)
    trained = train(algorithm, task, checked, x[:600], None if task == "anomaly" else y[:600])
    holdout = x[600:]
    export = export_onnx(trained, holdout) if onnx else OnnxExport(None, "not exported", None)
    spec = _spec(task)
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage("test-model-runtime", 1, "test-topic", [], len(x), 1),
        algorithm=algorithm,
        params=checked,
        metrics={},
        trained=trained,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=holdout,
        holdout_y=None,
        onnx=export,
    )
    return Registered(trained, logged, spec, holdout)


@pytest.fixture(scope="module")
def registered(stack_settings: Settings) -> dict[str, Registered]:
    """Every case trained and registered once, as a training run would (ONNX when possible)."""
    return {
        case: _register(stack_settings, f"{PREFIX}-{case}", algorithm, task, params, onnx=True)
        for case, algorithm, task, params in CASES
    }


def _rounded(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_family_scores_like_training_with_onnx_and_native(
    case: str, registered: dict[str, Registered], stack_settings: Settings
) -> None:
    reg = registered[case]
    trained, x = reg.trained, reg.holdout
    name, version = reg.logged.registered_model_name, reg.logged.version

    preferred = load_model_version(stack_settings.mlflow_url, name, version)
    validate(preferred)
    assert preferred.runtime == ("native" if case == "autoencoder" else "onnx")
    assert reg.logged.onnx == (preferred.runtime == "onnx")
    assert (preferred.model_name, preferred.version) == (name, version)
    assert preferred.feature_names == reg.spec.columns
    assert preferred.feature_spec == reg.spec.as_dict()
    assert preferred.task == trained.task
    assert preferred.load_seconds > 0
    if preferred.runtime == "onnx":
        # ONNX computes in float32: compare with native scores of the same rounded inputs.
        np.testing.assert_allclose(preferred.scores(x), trained.scores(_rounded(x)), atol=1e-5)

    native = load_model_version(stack_settings.mlflow_url, name, version, prefer_onnx=False)
    validate(native)
    assert native.runtime == "native"
    expected = trained.scores(x)
    np.testing.assert_allclose(native.scores(x), expected, rtol=1e-9, atol=1e-12)

    labels = native.labels(expected)
    if trained.task == "binary":
        assert labels == ["fraud" if s >= 0.5 else "ok" for s in expected]
        assert set(labels) == {"ok", "fraud"}
    elif trained.task == "multiclass":
        assert native.classes == LABELS["multiclass"]
        assert labels == [LABELS["multiclass"][i] for i in np.argmax(expected, axis=1)]
    elif trained.task == "regression":
        assert labels == [None] * len(x)
    else:
        assert native.threshold == trained.threshold
        assert labels == [bool(v) for v in trained.labels(x)]
        assert any(labels)


def test_a_version_without_onnx_is_served_natively(
    registered: dict[str, Registered], stack_settings: Settings
) -> None:
    reg = _register(
        stack_settings, f"{PREFIX}-lr", "logistic_regression", "binary", {"C": 0.5}, onnx=False
    )
    assert reg.logged.version == 2  # a second version of the registered model
    model = load_model_version(stack_settings.mlflow_url, reg.logged.registered_model_name, 2)
    validate(model)
    assert model.runtime == "native"
    np.testing.assert_allclose(model.scores(reg.holdout), reg.trained.scores(reg.holdout))


def test_a_model_logged_without_carrara_is_served_by_pyfunc_in_batches_only_if_trusted(
    stack_settings: Settings, mlflow_experiment: str
) -> None:
    rng = np.random.default_rng(4)
    frame = pd.DataFrame(
        {
            "amount": rng.normal(size=200),
            "age": rng.normal(size=200),
            "visits": rng.integers(0, 9, size=200),  # an integer column in the signature
        }
    )
    target = 2 * frame["amount"] - frame["age"] + 0.3 * frame["visits"]
    estimator = LinearRegression().fit(frame, target)
    name = f"{PREFIX}-plain"
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            estimator,
            name="model",
            input_example=frame.head(3),
            registered_model_name=name,
            pip_requirements=["scikit-learn"],
        )

    # pyfunc may run code bundled with the model: only for a version an admin trusted.
    with pytest.raises(ModelLoadError, match=r"refused: .* MLflow pyfunc, .* trusted code"):
        load_model_version(stack_settings.mlflow_url, name, 1)
    model = load_model_version(stack_settings.mlflow_url, name, 1, trusted_code=True)
    validate(model)
    assert model.runtime == "pyfunc"
    assert model.feature_names == ["amount", "age", "visits"]
    assert model.feature_spec is None
    assert model.task == "regression"
    scores = model.scores(frame.to_numpy(dtype=np.float64))
    np.testing.assert_allclose(scores, estimator.predict(frame), rtol=1e-9)
    assert model.labels(scores) == [None] * len(frame)


@pytest.fixture(scope="module")
def broken(registered: dict[str, Registered], stack_settings: Settings) -> dict[str, int]:
    """Versions of one registered model pointing the LR's native model at broken artifacts."""
    lr = registered["lr"]
    good_card = model_card(lr.trained, lr.spec.columns, lr.spec.as_dict())
    narrow = _spec("binary", width=WIDTH - 1)
    artifacts = {
        "card-not-json.json": "{not json",
        "card-mistyped.json": orjson.dumps({**good_card, "feature_names": "f0"}).decode(),
        "card-flavor.json": orjson.dumps({**good_card, "flavor": "catboost"}).decode(),
        "card-narrow.json": orjson.dumps(
            {**good_card, "feature_names": narrow.columns, "feature_spec": narrow.as_dict()}
        ).decode(),
        "card-good.json": orjson.dumps(good_card).decode(),
        "onnx/corrupt.onnx": "this is not an ONNX protobuf",
    }
    mlflow.set_tracking_uri(stack_settings.mlflow_url)
    mlflow.set_experiment("carrara/test-model-runtime")
    with mlflow.start_run() as run:
        for path, text in artifacts.items():
            mlflow.log_text(text, path)

    def uri(path: str) -> str:
        return f"runs:/{run.info.run_id}/{path}"

    onnx_tags = {"carrara.onnx": "true", "carrara.onnx_artifact": uri("onnx/corrupt.onnx")}
    lr_onnx = f"runs:/{lr.logged.mlflow_run_id}/onnx/model.onnx"
    cases = {
        "card-not-json": {"carrara.model_card": uri("card-not-json.json")},
        "card-mistyped": {"carrara.model_card": uri("card-mistyped.json")},
        "card-missing": {"carrara.model_card": uri("no-such-card.json")},
        "card-local-file": {"carrara.model_card": "file:///etc/passwd"},
        "flavor": {"carrara.model_card": uri("card-flavor.json")},
        "onnx-corrupt": {"carrara.model_card": uri("card-good.json"), **onnx_tags},
        "narrow": {
            "carrara.model_card": uri("card-narrow.json"),
            "carrara.onnx": "true",
            "carrara.onnx_artifact": lr_onnx,
        },
    }
    name = f"{PREFIX}-broken"
    return {
        case: int(mlflow.register_model(lr.logged.source, name, tags=tags).version)
        for case, tags in cases.items()
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("card-not-json", r"model card is not valid: JSON is malformed"),
        ("card-mistyped", r"model card is not valid: Expected `array`, got `str` - at `\$.feature"),
        ("card-missing", r"the model card at runs:/\w+/no-such-card.json could not be downloaded"),
        ("card-local-file", r"model card URI 'file:///etc/passwd' must be a runs:/"),
        ("flavor", r"unsupported flavor 'catboost'"),
        ("onnx-corrupt", r"the ONNX artifact cannot be loaded"),
    ],
)
def test_a_broken_version_is_refused_with_the_reason(
    case: str, message: str, broken: dict[str, int], stack_settings: Settings
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model_version(stack_settings.mlflow_url, f"{PREFIX}-broken", broken[case])


@pytest.mark.parametrize("prefer_onnx", [True, False])
def test_a_model_whose_width_differs_from_its_card_fails_validation(
    prefer_onnx: bool, broken: dict[str, int], stack_settings: Settings
) -> None:
    model = load_model_version(
        stack_settings.mlflow_url, f"{PREFIX}-broken", broken["narrow"], prefer_onnx=prefer_onnx
    )
    assert model.runtime == ("onnx" if prefer_onnx else "native")
    with pytest.raises(ModelValidationError, match="takes 6 features but its card lists 5"):
        validate(model)


def test_a_missing_version_is_named(
    registered: dict[str, Registered], stack_settings: Settings
) -> None:
    name = registered["lr"].logged.registered_model_name
    with pytest.raises(ModelLoadError, match=rf"{name}/99: no such model version"):
        load_model_version(stack_settings.mlflow_url, name, 99)
    with pytest.raises(ModelLoadError, match="a model version is a positive integer"):
        load_model_version(stack_settings.mlflow_url, name, 0)


@pytest.fixture
def cache(stack_settings: Settings) -> ModelCache:
    return ModelCache(stack_settings.mlflow_url)


def test_the_cache_loads_each_version_once_and_evicts(
    cache: ModelCache,
    registered: dict[str, Registered],
    broken: dict[str, int],
    stack_settings: Settings,
) -> None:
    lgbm = registered["lgbm"].logged.registered_model_name
    xgb = registered["xgb"].logged.registered_model_name
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(lgbm, 1))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One load for concurrent gets: every thread got the very same object.
    assert len(results) == 4
    assert all(r is results[0] for r in results)
    assert cache.get(lgbm, 1) is results[0]
    second = cache.get(xgb, 1)
    assert cache.loaded() == sorted([f"{lgbm}/1", f"{xgb}/1"])

    # A broken version is refused and not cached; the loaded ones are untouched.
    with pytest.raises(ModelValidationError, match="takes 6 features"):
        cache.get(f"{PREFIX}-broken", broken["narrow"])
    assert cache.loaded() == sorted([f"{lgbm}/1", f"{xgb}/1"])

    assert cache.retain([(xgb, 1)]) == [f"{lgbm}/1"]
    assert cache.loaded() == [f"{xgb}/1"]
    assert cache.get(xgb, 1) is second
    reloaded = cache.get(lgbm, 1)  # evicted: loaded again
    assert reloaded is not results[0]
    x = registered["lgbm"].holdout
    np.testing.assert_array_equal(reloaded.scores(x), results[0].scores(x))
    assert cache.retain([]) == sorted([f"{lgbm}/1", f"{xgb}/1"])
    assert cache.loaded() == []


def test_scores_refuse_a_matrix_of_the_wrong_width(
    registered: dict[str, Registered], stack_settings: Settings
) -> None:
    reg = registered["lr"]
    model = load_model_version(stack_settings.mlflow_url, reg.logged.registered_model_name, 1)
    with pytest.raises(ValueError, match=r"scores \(rows, 6\) matrices, got shape \(3, 5\)"):
        model.scores(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"got shape \(6,\)"):
        model.scores(np.zeros(6))


@pytest.mark.parametrize("prefer_onnx", [True, False])
def test_pinned_digests_are_verified_before_loading(
    prefer_onnx: bool, registered: dict[str, Registered], stack_settings: Settings
) -> None:
    logged = registered["lgbm"].logged
    digests = logged.artifact_digests
    assert digests is not None
    assert {"carrara_model.json", "onnx/model.onnx", "model/MLmodel"} <= set(digests)
    name = logged.registered_model_name
    model = load_model_version(
        stack_settings.mlflow_url, name, 1, prefer_onnx=prefer_onnx, digests=digests
    )
    assert model.runtime == ("onnx" if prefer_onnx else "native")
    assert model.digests == digests
    # Other bytes pinned for the model file (or the card): refused, naming the file.
    target = "onnx/model.onnx" if prefer_onnx else "model/model.skops"
    for key in (target, "carrara_model.json"):
        wrong = {**digests, key: "sha256:" + "0" * 64}
        with pytest.raises(ModelLoadError, match=rf"refused: .*{key}.* changed since"):
            load_model_version(
                stack_settings.mlflow_url, name, 1, prefer_onnx=prefer_onnx, digests=wrong
            )
