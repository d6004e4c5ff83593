"""The runtimes a model version loads into (see model_runtime's docstring): ONNX Runtime, the
native files read by Carrara's own code (LightGBM/XGBoost native formats, skops with Carrara's
allow-list; pickle and cloudpickle only for versions trusted to run code), and MLflow pyfunc.

Each `load_*` downloads what it needs through a verifying `model_card.Fetcher` and returns a
`LoadedModel` whose `scorer` answers the scoring contract.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from carrara.artifacts import (
    LIGHTGBM_BOOSTER,
    MODEL_PREFIX,
    ONNX_KEY,
    SKOPS_ALLOWED_TYPES,
    XGBOOST_CLASSES,
    XGBOOST_FORMATS,
    refused_skops_types,
)

# MLflow reads this at each download: tqdm bars on stderr would garble the structured logs.
from carrara.scoring.model_card import (
    NATIVE_FLAVORS,
    Fetcher,
    LoadedModel,
    ModelCard,
    ModelLoadError,
    input_example,
    loaded_model,
    read_mlmodel,
)

log = structlog.get_logger(__name__)


def load_onnx(fetch: Fetcher, card: ModelCard, model_uri: str, onnx_uri: str) -> LoadedModel:
    key = fetch.key
    if card.task == "anomaly" or card.algorithm == "autoencoder":
        raise ModelLoadError(f"{key}: ONNX artifacts of anomaly models are not supported")
    model_bytes = fetch.read(onnx_uri, "ONNX artifact", ONNX_KEY)
    scorer = OnnxScorer(key, model_bytes, card)
    with tempfile.TemporaryDirectory(prefix="carrara-model-") as tmp:
        directory = Path(tmp)
        # Only the MLmodel file and the input example: the native model is not needed here.
        fetch.download(f"{model_uri}/MLmodel", "MLmodel file", tmp, f"{MODEL_PREFIX}MLmodel")
        mlmodel = read_mlmodel(key, directory)
        info = mlmodel.saved_input_example_info or {}
        if info.get("artifact_path"):
            example_path = str(info["artifact_path"])
            fetch.download(
                f"{model_uri}/{example_path}",
                "input example",
                tmp,
                f"{MODEL_PREFIX}{example_path}",
            )
        example = input_example(key, mlmodel, directory, card.feature_names)
    return loaded_model(
        fetch, card, "onnx", input_example=example, model_width=scorer.width, scorer=scorer
    )


class OnnxScorer:
    """ONNX Runtime on one thread: the scorer scales out by processes, not threads."""

    def __init__(self, key: str, model_bytes: bytes, card: ModelCard) -> None:
        import onnxruntime as ort

        task = "anomaly" if card.task == "anomaly" else card.task

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # converters declare shapes loosely; warnings are noise
        try:
            self._session = ort.InferenceSession(
                model_bytes, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelLoadError(f"{key}: the ONNX artifact cannot be loaded: {exc}") from exc
        inputs = {i.name: i for i in self._session.get_inputs()}
        if card.onnx_input is not None and card.onnx_input not in inputs:
            raise ModelLoadError(f"{key}: the ONNX model has no input {card.onnx_input!r}")
        model_input = inputs[card.onnx_input] if card.onnx_input else self._session.get_inputs()[0]
        self._input = model_input.name
        self._dtype = np.float64 if model_input.type == "tensor(double)" else np.float32
        shape = model_input.shape
        self.width = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        outputs = [o.name for o in self._session.get_outputs()]
        if card.onnx_output is not None:
            if card.onnx_output not in outputs:
                raise ModelLoadError(f"{key}: the ONNX model has no output {card.onnx_output!r}")
            self._output = card.onnx_output
        elif task in ("regression", "anomaly"):
            self._output = outputs[0]
        else:
            # Converters name the probability tensor differently; it comes after the label.
            named = [o for o in outputs if "prob" in o.lower()]
            self._output = named[0] if named else outputs[-1]
        self.task = task

    def __call__(self, x: np.ndarray) -> np.ndarray:
        feed = {self._input: x.astype(self._dtype, copy=False)}
        (out,) = self._session.run([self._output], feed)
        values = np.asarray(out, dtype=np.float64)
        if self.task in ("regression", "anomaly"):
            return values.reshape(-1)
        if self.task == "binary":
            if values.ndim == 2 and values.shape[1] == 2:
                return values[:, 1]
            if values.ndim == 2 and values.shape[1] == 1:
                return values[:, 0]
        return values


def load_native(fetch: Fetcher, card: ModelCard, model_uri: str) -> LoadedModel:
    key = fetch.key
    if card.flavor not in NATIVE_FLAVORS:
        raise ModelLoadError(
            f"{key}: unsupported flavor {card.flavor!r} (supported: {', '.join(NATIVE_FLAVORS)})"
        )
    with tempfile.TemporaryDirectory(prefix="carrara-model-") as tmp:
        directory = fetch.download(model_uri, "model", tmp, MODEL_PREFIX)
        mlmodel = read_mlmodel(key, directory)
        if card.flavor not in mlmodel.flavors:
            raise ModelLoadError(
                f"{key}: the card names flavor {card.flavor!r} but the model has "
                f"{sorted(mlmodel.flavors)}"
            )
        example = input_example(key, mlmodel, directory, card.feature_names)
        if card.flavor == "onnx":
            onnx_path = _inside(key, directory, mlmodel.flavors["onnx"].get("data"))
            scorer = OnnxScorer(key, onnx_path.read_bytes(), card)
            return loaded_model(
                fetch,
                card,
                "onnx",
                input_example=example,
                model_width=scorer.width,
                scorer=scorer,
                handles_missing=card.handles_missing,
            )
        try:
            estimator = _load_estimator(key, card.flavor, mlmodel, directory, fetch.trusted_code)
        except ModelLoadError:
            raise
        except Exception as exc:  # deserialisation errors come in every type
            raise ModelLoadError(
                f"{key}: the {card.flavor} model cannot be loaded: {type(exc).__name__}: {exc}"
            ) from exc
    scorer = _native_scorer(key, estimator, card)
    width = getattr(estimator, "n_features_in_", None)
    return loaded_model(
        fetch,
        card,
        "native",
        input_example=example,
        model_width=int(width) if width is not None else None,
        scorer=scorer,
    )


TRUST_HINT = (
    "an admin must mark the version as trusted code "
    "(PUT /api/v1/models/{name}/versions/{version}/trust) for scorers to load it"
)


def _untrusted(fetch_key: str, what: str) -> ModelLoadError:
    name, _, version = fetch_key.rpartition("/")
    hint = TRUST_HINT.format(name=name, version=version)
    return ModelLoadError(f"{fetch_key}: refused: {what}; {hint}")


def _inside(key: str, directory: Path, relative: Any) -> Path:
    """`directory / relative`, refusing a path (from the MLmodel file) that leaves it."""
    if not isinstance(relative, str) or not relative:
        raise ModelLoadError(f"{key}: the MLmodel file names no model file")
    path = (directory / relative).resolve()
    if not path.is_relative_to(directory.resolve()) or not path.is_file():
        raise ModelLoadError(f"{key}: the model file {relative!r} is not in the model directory")
    return path


def _load_estimator(
    key: str, flavor: str, mlmodel: Model, directory: Path, trusted_code: bool
) -> Any:
    """The estimator of a sklearn/lightgbm/xgboost MLflow model, read by Carrara (never by the
    flavour's loader, which would follow the MLmodel file's format and trusted types)."""
    conf: dict[str, Any] = dict(mlmodel.flavors[flavor])
    if flavor == "xgboost":
        model_class = str(conf.get("model_class", "xgboost.core.Booster"))
        model_format = str(conf.get("model_format", ""))
        if model_class not in XGBOOST_CLASSES:
            raise ModelLoadError(f"{key}: unsupported XGBoost model class {model_class!r}")
        if model_format not in XGBOOST_FORMATS:
            raise ModelLoadError(
                f"{key}: unsupported XGBoost model format {model_format!r} "
                f"(supported: {', '.join(sorted(XGBOOST_FORMATS))})"
            )
        import xgboost as xgb

        classes: dict[str, Callable[[], Any]] = {
            "xgboost.sklearn.XGBClassifier": xgb.XGBClassifier,
            "xgboost.sklearn.XGBRegressor": xgb.XGBRegressor,
            "xgboost.core.Booster": xgb.Booster,
        }
        estimator = classes[model_class]()
        estimator.load_model(str(_inside(key, directory, conf.get("data"))))
        return estimator
    if flavor == "lightgbm":
        path = _inside(key, directory, conf.get("data"))
        if conf.get("model_class", LIGHTGBM_BOOSTER) == LIGHTGBM_BOOSTER:
            import lightgbm as lgb

            return lgb.Booster(model_file=str(path))  # LightGBM's text format
        return load_serialized(key, path, str(conf.get("serialization_format")), trusted_code)
    path = _inside(key, directory, conf.get("pickled_model"))
    return load_serialized(key, path, str(conf.get("serialization_format", "pickle")), trusted_code)


def load_serialized(key: str, path: Path, serialization: str, trusted_code: bool) -> Any:
    """A skops file with Carrara's allow-list; pickle/cloudpickle only when trusted."""
    if serialization == "skops":
        import skops.io

        types = skops.io.get_untrusted_types(file=path)
        refused = refused_skops_types(types)
        if refused and not trusted_code:
            raise _untrusted(
                key,
                f"the skops file holds types outside Carrara's allow-list "
                f"({', '.join(refused[:10])})",
            )
        allowed = types if trusted_code else sorted(SKOPS_ALLOWED_TYPES & set(types))
        return skops.io.load(path, trusted=allowed)
    if serialization in ("pickle", "cloudpickle"):
        if not trusted_code:
            raise _untrusted(key, f"the model is a {serialization} file, which runs code when read")
        log.warning("loading trusted code", model=key, serialization=serialization)
        with path.open("rb") as handle:
            if serialization == "cloudpickle":
                import cloudpickle

                return cloudpickle.load(handle)
            import pickle

            return pickle.load(handle)  # noqa: S301 - an admin marked the version trusted
    raise ModelLoadError(f"{key}: unsupported serialization format {serialization!r}")


_PICKLE_FLAG = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
_pickle_flag_lock = threading.Lock()


def _load_pyfunc_trusted(directory: Path) -> Any:
    """MLflow pyfunc with pickle deserialisation allowed for this one (trusted) load."""
    import mlflow.pyfunc

    with _pickle_flag_lock:
        previous = os.environ.get(_PICKLE_FLAG)
        os.environ[_PICKLE_FLAG] = "true"
        try:
            return mlflow.pyfunc.load_model(str(directory))
        finally:
            if previous is None:
                os.environ.pop(_PICKLE_FLAG, None)
            else:
                os.environ[_PICKLE_FLAG] = previous


def _native_scorer(key: str, estimator: Any, card: ModelCard) -> Callable[[np.ndarray], np.ndarray]:
    """`estimator` wrapped to the scoring contract (as TrainedModel.scores does)."""
    if card.algorithm == "autoencoder" or card.task == "anomaly":
        steps = getattr(estimator, "steps", None)
        if not steps or len(steps) < 2:
            raise ModelLoadError(f"{key}: an autoencoder must be a pipeline ending in the network")

        def reconstruction_error(x: np.ndarray) -> np.ndarray:
            # Same as carrara.training.trainers.reconstruction_error (not importable here).
            prepared = estimator[:-1].transform(x)
            reconstructed = np.asarray(estimator[-1].predict(prepared))
            return np.mean((reconstructed - prepared) ** 2, axis=1)

        return reconstruction_error
    if card.task == "regression":
        return lambda x: np.asarray(estimator.predict(x), dtype=np.float64).reshape(-1)
    if not hasattr(estimator, "predict_proba"):
        raise ModelLoadError(f"{key}: a {card.task} model must have predict_proba")
    if card.task == "binary":
        return lambda x: np.asarray(estimator.predict_proba(x), dtype=np.float64)[:, 1]
    return lambda x: np.asarray(estimator.predict_proba(x), dtype=np.float64)


def load_pyfunc(fetch: Fetcher, model_uri: str) -> LoadedModel:
    """A version registered without a Carrara card, served by MLflow pyfunc on whole batches."""
    key = fetch.key
    if not fetch.trusted_code:
        raise _untrusted(
            key,
            "a model without a Carrara model card is served through MLflow pyfunc, which may "
            "run code bundled with it",
        )
    # Kept while the model lives: a pyfunc model may read its files at predict time.
    directory_root = tempfile.mkdtemp(prefix="carrara-pyfunc-")
    try:
        directory = fetch.download(model_uri, "model", directory_root, MODEL_PREFIX)
        mlmodel = read_mlmodel(key, directory)
        if "python_function" not in mlmodel.flavors:
            raise ModelLoadError(
                f"{key}: unsupported model: no Carrara model card and no python_function flavor "
                f"(flavors: {sorted(mlmodel.flavors)})"
            )
        names, casts = _pyfunc_columns(key, mlmodel, directory)
        example = input_example(key, mlmodel, directory, names)
        try:
            pyfunc_model = _load_pyfunc_trusted(directory)
        except Exception as exc:
            raise ModelLoadError(
                f"{key}: the pyfunc model cannot be loaded: {type(exc).__name__}: {exc}"
            ) from exc
    except BaseException:
        shutil.rmtree(directory_root, ignore_errors=True)
        raise
    scorer = _PyfuncScorer(pyfunc_model, names, casts)
    loaded = LoadedModel(
        model_name=fetch.name,
        version=fetch.version,
        runtime="pyfunc",
        task="regression",
        algorithm=None,
        feature_names=names,
        feature_spec=None,
        classes=None,
        threshold=None,
        load_seconds=0.0,
        input_example=example,
        model_width=len(names),
        scorer=scorer,
    )
    weakref.finalize(loaded, shutil.rmtree, directory_root, True)
    return loaded


def _pyfunc_columns(key: str, mlmodel: Model, directory: Path) -> tuple[list[str], dict[str, Any]]:
    """The input column names, and the integer/bool columns to cast from float features."""
    inputs = mlmodel.signature.inputs if mlmodel.signature is not None else None
    if inputs is not None and inputs.has_input_names():
        names = [str(n) for n in inputs.input_names()]
        try:
            types = inputs.numpy_types()
        except MlflowException as exc:
            raise ModelLoadError(f"{key}: unsupported input types in the signature: {exc}") from exc
        casts: dict[str, Any] = {}
        for name, dtype in zip(names, types, strict=True):
            kind = np.dtype(dtype).kind
            if kind not in "fiub":
                raise ModelLoadError(
                    f"{key}: input column {name!r} is of type {dtype}; the scorer feeds numbers"
                )
            if kind in "iub":
                casts[name] = np.dtype(dtype)
        return names, casts
    if mlmodel.saved_input_example_info:
        try:
            example: Any = mlmodel.load_input_example(str(directory))
        except Exception as exc:
            raise ModelLoadError(f"{key}: the input example cannot be read: {exc}") from exc
        if hasattr(example, "columns"):
            return [str(c) for c in example.columns], {}
    raise ModelLoadError(
        f"{key}: no model card and no input column names (neither a column signature nor a "
        "DataFrame input example): the scorer cannot tell which features the model takes"
    )


class _PyfuncScorer:
    """One pyfunc predict per batch, on a DataFrame built once from the matrix."""

    def __init__(self, model: Any, names: list[str], casts: dict[str, Any]) -> None:
        import pandas as pd

        self._frame = pd.DataFrame
        self._model = model
        self._names = names
        self._casts = casts

    def __call__(self, x: np.ndarray) -> np.ndarray:
        frame = self._frame(x, columns=self._names, copy=False)
        if self._casts:
            frame = frame.astype(self._casts)  # NaN in an int column raises: a bad event
        out = self._model.predict(frame)
        values = np.asarray(out.to_numpy() if hasattr(out, "to_numpy") else out, np.float64)
        return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values
