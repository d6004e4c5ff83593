"""Load a registered model version from the MLflow server, validate it, and score whole batches.

Runtimes, in order of preference (benchmarks/RESULTS.md: ONNX Runtime is ~5-20x faster per
batch here and loads in ~0.4 s cold against ~3 s for the sklearn flavor):

- `onnx`: the version's ONNX artifact, when training tagged it as parity-checked
  (`carrara.onnx_artifact`), run by ONNX Runtime on one intra-op thread;
- `native`: the flavor named by the model card (sklearn | lightgbm | xgboost), loaded with MLflow
  and wrapped to the scoring contract;
- `pyfunc`: MLflow pyfunc for versions registered outside Carrara (no model card), predicting a
  whole batch as one DataFrame named after the signature's input columns.

Every runtime answers `scores(x)` with the contract of `carrara.training.trainers.TrainedModel`:
binary -> P(positive) (n,); multiclass -> (n, classes); regression -> (n,); anomaly ->
reconstruction error (n,), alert above the card's threshold. Models without a card are served as
numeric predictors (task "regression": score = the model's output, no label).

Everything is fetched over HTTP from the MLflow server (registry, run and logged-model artifacts):
scorers share no disk with it. Artifact URIs in version tags are accepted only as `runs:/` or
`mlflow-artifacts:` URIs, so a tag cannot send a scorer to another store or a local path.

What MLflow serves is not trusted (carrara.artifacts): when the deployment spec pins the version's
digests, every downloaded file is checked against them before it is read; models are read only
from formats that execute no code (ONNX, LightGBM/XGBoost native files, skops with Carrara's own
allow-list of types, never the one in the `MLmodel` file), by Carrara's code rather than MLflow's
flavour loaders. Pickle, cloudpickle and pyfunc (which may bundle code) load only when the spec
says an admin marked the version as trusted code.

This module must not import `carrara.training` or the database (docs/architecture.md): the few
lines of the autoencoder's score are repeated here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import structlog
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from carrara.artifacts import (
    CARD_KEY,
    LIGHTGBM_BOOSTER,
    MODEL_PREFIX,
    ONNX_KEY,
    SKOPS_ALLOWED_TYPES,
    XGBOOST_CLASSES,
    XGBOOST_FORMATS,
    DigestMismatch,
    refused_skops_types,
    sha256_file,
    verify,
    verify_directory,
)

# MLflow reads this at each download: tqdm bars on stderr would garble the structured logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
log = structlog.get_logger(__name__)

RuntimeKind = Literal["onnx", "native", "pyfunc"]
Task = Literal["binary", "multiclass", "regression", "anomaly"]

TAG_ONNX = "carrara.onnx"
TAG_ONNX_ARTIFACT = "carrara.onnx_artifact"
TAG_MODEL_CARD = "carrara.model_card"
TAG_ALGORITHM = "carrara.algorithm"
CARD_FORMAT = 1
NATIVE_FLAVORS = ("sklearn", "lightgbm", "xgboost", "onnx")
# Tag URIs must resolve through the tracking server, never to another store or a local file.
ALLOWED_TAG_URI_PREFIXES = ("runs:/", "mlflow-artifacts:")
# A probability row of a multiclass model sums to 1 up to float32 rounding in ONNX.
PROBABILITY_SUM_TOLERANCE = 1e-3


class ModelLoadError(RuntimeError):
    """A model version cannot be loaded (missing, broken artifact, unsupported flavor...)."""


class ModelValidationError(RuntimeError):
    """A loaded model version does not score its own input example as its card promises."""


class ModelCard(msgspec.Struct, kw_only=True):
    """`carrara_model.json`, as `carrara.training.mlflow_logging.model_card` writes it."""

    format: int
    algorithm: str
    task: Task
    flavor: str
    feature_names: list[str]
    feature_spec: dict[str, Any] | None = None
    classes: list[Any] | None = None
    threshold: float | None = None
    score: str | None = None
    # ONNX models uploaded to Carrara: the input and output tensors to use, and whether the model
    # scores rows with missing values (NaN) as finite numbers.
    onnx_input: str | None = None
    onnx_output: str | None = None
    handles_missing: bool = True


@dataclass(eq=False)
class LoadedModel:
    """One registered model version, ready to score batches of feature rows."""

    model_name: str
    version: int
    runtime: RuntimeKind
    task: Task
    algorithm: str | None
    feature_names: list[str]
    # `FeatureSpec.as_dict()` from the model card (None for models registered without a card).
    feature_spec: dict[str, Any] | None = field(repr=False)
    # The label of each score column: multiclass classes in column order, binary
    # [negative, positive]; mapped through the spec's label_classes (None for regression/anomaly).
    classes: list[Any] | None
    threshold: float | None
    load_seconds: float
    # Rows to validate with (the MLflow model's input example), float64 (n, features).
    input_example: np.ndarray | None = field(default=None, repr=False)
    # How many columns the model itself takes, when it says (checked against the card).
    model_width: int | None = field(default=None, repr=False)
    scorer: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    # Whether validation also scores a row of missing values (Carrara's models handle NaN).
    handles_missing: bool = field(default=True, repr=False)
    # The pinned digests the files were verified against (None: not pinned), and whether the
    # version was loaded as trusted code: a cached model serves only the same expectations.
    digests: dict[str, str] | None = field(default=None, repr=False)
    trusted_code: bool = False

    @property
    def key(self) -> str:
        return f"{self.model_name}/{self.version}"

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Scores of the float64 rows `x` (n, features), per the contract in the module doc."""
        width = len(self.feature_names)
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{self.key} scores (rows, {width}) matrices, got shape {x.shape}")
        assert self.scorer is not None
        return self.scorer(x)

    def labels(self, scores: np.ndarray) -> list[Any]:
        """Labels for `scores`: the class (binary, multiclass), None (regression), alert flag."""
        if self.task == "anomaly":
            assert self.threshold is not None
            return (scores > self.threshold).tolist()
        if self.task == "regression":
            return [None] * len(scores)
        if self.task == "binary":
            negative, positive = (self.classes or [0, 1])[0], (self.classes or [0, 1])[-1]
            return [positive if hit else negative for hit in (scores >= 0.5).tolist()]
        best = np.argmax(scores, axis=1).tolist()
        return best if self.classes is None else [self.classes[i] for i in best]


# --- loading --------------------------------------------------------------------------------


def load_model_version(
    tracking_uri: str,
    name: str,
    version: int | str,
    *,
    prefer_onnx: bool = True,
    digests: dict[str, str] | None = None,
    trusted_code: bool = False,
) -> LoadedModel:
    """Load `name`/`version` from the MLflow server with the fastest runtime it allows.

    With `digests` (from the deployment spec) every file is verified before it is read; only
    `trusted_code` versions may load from formats that execute code.
    """
    started = time.perf_counter()
    number = _version_number(name, version)
    key = f"{name}/{number}"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version(name, str(number))
        model_uri = client.get_model_version_download_uri(name, str(number))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelLoadError(
                f"{key}: no such model version in the registry at {tracking_uri}"
            ) from exc
        raise ModelLoadError(f"{key}: the registry at {tracking_uri} failed: {exc}") from exc
    if mv.status != "READY":
        raise ModelLoadError(f"{key}: the version is {mv.status}, not READY ({mv.status_message})")
    tags = dict(mv.tags or {})
    fetch = _Fetcher(tracking_uri, name, number, digests, trusted_code)
    if digests is None:
        log.warning("model version loaded without pinned digests", model=key)
    card_uri = tags.get(TAG_MODEL_CARD)
    if card_uri:
        card = _parse_card(key, fetch.read(card_uri, "model card", CARD_KEY))
        onnx_uri = tags.get(TAG_ONNX_ARTIFACT) if tags.get(TAG_ONNX) == "true" else None
        if prefer_onnx and onnx_uri and card.flavor != "onnx":
            loaded = _load_onnx(fetch, card, model_uri, onnx_uri)
        else:
            loaded = _load_native(fetch, card, model_uri)
    else:
        loaded = _load_pyfunc(fetch, model_uri)
        loaded.algorithm = tags.get(TAG_ALGORITHM)
    loaded.digests = digests
    loaded.trusted_code = trusted_code
    loaded.load_seconds = time.perf_counter() - started
    log.info(
        "model version loaded",
        model=key,
        runtime=loaded.runtime,
        task=loaded.task,
        seconds=round(loaded.load_seconds, 3),
    )
    return loaded


def _version_number(name: str, version: int | str) -> int:
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ModelLoadError(f"{name}/{version}: a model version is a positive integer")
    return number


class _Fetcher:
    """Downloads artifacts of one model version over HTTP, with errors naming what failed.

    With pinned `digests`, every download is verified under its key (carrara.artifacts) before
    anything reads it.
    """

    def __init__(
        self,
        tracking_uri: str,
        name: str,
        version: int,
        digests: dict[str, str] | None = None,
        trusted_code: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.name = name
        self.version = version
        self.key = f"{name}/{version}"
        self.digests = digests
        self.trusted_code = trusted_code

    def download(self, uri: str, what: str, dst: str, digest_key: str) -> Path:
        """Download `uri` into `dst` and verify it as `digest_key` (a file, or a directory when
        the key ends with "/")."""
        path = self._download(uri, what, dst)
        if self.digests is not None:
            try:
                if digest_key.endswith("/"):
                    if not path.is_dir():
                        raise DigestMismatch(f"{digest_key} is not a directory")
                    verify_directory(self.digests, path, digest_key)
                else:
                    if not path.is_file():
                        raise DigestMismatch(f"{digest_key} is not a file")
                    verify(self.digests, {digest_key: sha256_file(path)})
            except DigestMismatch as exc:
                raise ModelLoadError(
                    f"{self.key}: refused: the {what} does not match the digests pinned at "
                    f"registration: {exc}"
                ) from exc
        return path

    def _download(self, uri: str, what: str, dst: str) -> Path:
        if not uri.startswith(ALLOWED_TAG_URI_PREFIXES):
            raise ModelLoadError(
                f"{self.key}: the {what} URI {uri!r} must be a runs:/ or mlflow-artifacts: URI "
                "(scorers fetch artifacts through the MLflow server, run with --serve-artifacts)"
            )
        try:
            path = download_artifacts(
                artifact_uri=uri,
                dst_path=dst,
                tracking_uri=self.tracking_uri,
                registry_uri=self.tracking_uri,
            )
        except (MlflowException, OSError) as exc:
            raise ModelLoadError(
                f"{self.key}: the {what} at {uri} could not be downloaded: {exc}"
            ) from exc
        return Path(path)

    def read(self, uri: str, what: str, digest_key: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="carrara-model-") as tmp:
            path = self.download(uri, what, tmp, digest_key)
            if not path.is_file():
                raise ModelLoadError(f"{self.key}: the {what} at {uri} is not a file")
            return path.read_bytes()


def _parse_card(key: str, raw: bytes) -> ModelCard:
    try:
        card = msgspec.json.decode(raw, type=ModelCard)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ModelLoadError(f"{key}: the model card is not valid: {exc}") from exc
    if card.format != CARD_FORMAT:
        raise ModelLoadError(f"{key}: unsupported model card format {card.format}")
    if not card.feature_names:
        raise ModelLoadError(f"{key}: the model card lists no features")
    if card.task == "anomaly" and card.threshold is None:
        raise ModelLoadError(f"{key}: the anomaly model's card has no threshold")
    if card.feature_spec is not None:
        _check_feature_spec(key, card)
    return card


def _check_feature_spec(key: str, card: ModelCard) -> None:
    # The scorer encodes events with this spec: it must parse and give the model's columns.
    from carrara.streams.event_codec import FeatureSpec

    try:
        spec = FeatureSpec.from_dict(card.feature_spec or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{key}: the model card's feature spec is not valid: {exc}") from exc
    if spec.model_columns != card.feature_names:
        raise ModelLoadError(
            f"{key}: the feature spec's columns {spec.model_columns} differ from the card's "
            f"feature_names {card.feature_names}"
        )


def _class_labels(card: ModelCard) -> list[Any] | None:
    """The label of each score column, mapping the model's class codes through the spec."""
    if card.task not in ("binary", "multiclass"):
        return None
    label_classes = (card.feature_spec or {}).get("label_classes")
    codes = card.classes
    if card.task == "binary" and label_classes and len(label_classes) == 2:
        return list(label_classes)  # [negative, positive]: positive = label_classes[-1]
    if label_classes and codes:
        try:
            return [label_classes[int(c)] for c in codes]
        except (IndexError, TypeError, ValueError):
            return list(codes)  # not codes into the spec: the classes are the labels
    return list(codes) if codes else None


def _loaded(fetch: _Fetcher, card: ModelCard, runtime: RuntimeKind, **fields: Any) -> LoadedModel:
    task: Task = "anomaly" if card.algorithm == "autoencoder" else card.task
    return LoadedModel(
        model_name=fetch.name,
        version=fetch.version,
        runtime=runtime,
        task=task,
        algorithm=card.algorithm,
        feature_names=list(card.feature_names),
        feature_spec=card.feature_spec,
        classes=_class_labels(card),
        threshold=card.threshold,
        load_seconds=0.0,
        **fields,
    )


def _read_mlmodel(key: str, directory: Path) -> Model:
    try:
        return Model.load(str(directory / "MLmodel"))
    except Exception as exc:  # YAML or schema errors of all kinds: the version is broken
        raise ModelLoadError(f"{key}: the MLmodel file cannot be read: {exc}") from exc


def _input_example(
    key: str, mlmodel: Model, directory: Path, feature_names: list[str]
) -> np.ndarray | None:
    """The model's input example as float64 rows in `feature_names` order (None without one)."""
    if not mlmodel.saved_input_example_info:
        return None
    try:
        example: Any = mlmodel.load_input_example(str(directory))  # DataFrame, array, ...
    except Exception as exc:
        raise ModelLoadError(f"{key}: the input example cannot be read: {exc}") from exc
    if example is None:
        return None
    try:
        if hasattr(example, "columns"):  # a DataFrame: take the features by name
            missing = [n for n in feature_names if n not in example.columns]
            if missing:
                raise ModelLoadError(f"{key}: the input example lacks columns {missing[:10]}")
            example = example[feature_names].to_numpy()
        matrix = np.asarray(example, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{key}: the input example is not numeric: {exc}") from exc
    return matrix.reshape(1, -1) if matrix.ndim == 1 else matrix


def _load_onnx(fetch: _Fetcher, card: ModelCard, model_uri: str, onnx_uri: str) -> LoadedModel:
    key = fetch.key
    if card.task == "anomaly" or card.algorithm == "autoencoder":
        raise ModelLoadError(f"{key}: ONNX artifacts of anomaly models are not supported")
    model_bytes = fetch.read(onnx_uri, "ONNX artifact", ONNX_KEY)
    scorer = _OnnxScorer(key, model_bytes, card)
    with tempfile.TemporaryDirectory(prefix="carrara-model-") as tmp:
        directory = Path(tmp)
        # Only the MLmodel file and the input example: the native model is not needed here.
        fetch.download(f"{model_uri}/MLmodel", "MLmodel file", tmp, f"{MODEL_PREFIX}MLmodel")
        mlmodel = _read_mlmodel(key, directory)
        info = mlmodel.saved_input_example_info or {}
        if info.get("artifact_path"):
            example_path = str(info["artifact_path"])
            fetch.download(
                f"{model_uri}/{example_path}",
                "input example",
                tmp,
                f"{MODEL_PREFIX}{example_path}",
            )
        example = _input_example(key, mlmodel, directory, card.feature_names)
    return _loaded(
        fetch, card, "onnx", input_example=example, model_width=scorer.width, scorer=scorer
    )


class _OnnxScorer:
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


def _load_native(fetch: _Fetcher, card: ModelCard, model_uri: str) -> LoadedModel:
    key = fetch.key
    if card.flavor not in NATIVE_FLAVORS:
        raise ModelLoadError(
            f"{key}: unsupported flavor {card.flavor!r} (supported: {', '.join(NATIVE_FLAVORS)})"
        )
    with tempfile.TemporaryDirectory(prefix="carrara-model-") as tmp:
        directory = fetch.download(model_uri, "model", tmp, MODEL_PREFIX)
        mlmodel = _read_mlmodel(key, directory)
        if card.flavor not in mlmodel.flavors:
            raise ModelLoadError(
                f"{key}: the card names flavor {card.flavor!r} but the model has "
                f"{sorted(mlmodel.flavors)}"
            )
        example = _input_example(key, mlmodel, directory, card.feature_names)
        if card.flavor == "onnx":
            onnx_path = _inside(key, directory, mlmodel.flavors["onnx"].get("data"))
            scorer = _OnnxScorer(key, onnx_path.read_bytes(), card)
            return _loaded(
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
    return _loaded(
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
        return _load_serialized(key, path, str(conf.get("serialization_format")), trusted_code)
    path = _inside(key, directory, conf.get("pickled_model"))
    return _load_serialized(
        key, path, str(conf.get("serialization_format", "pickle")), trusted_code
    )


def _load_serialized(key: str, path: Path, serialization: str, trusted_code: bool) -> Any:
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


def _load_pyfunc(fetch: _Fetcher, model_uri: str) -> LoadedModel:
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
        mlmodel = _read_mlmodel(key, directory)
        if "python_function" not in mlmodel.flavors:
            raise ModelLoadError(
                f"{key}: unsupported model: no Carrara model card and no python_function flavor "
                f"(flavors: {sorted(mlmodel.flavors)})"
            )
        names, casts = _pyfunc_columns(key, mlmodel, directory)
        example = _input_example(key, mlmodel, directory, names)
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


# --- validation -----------------------------------------------------------------------------


def validate(model: LoadedModel) -> None:
    """Score the model's input example (or rows built from its card) and check the scores."""
    width = len(model.feature_names)
    if model.model_width is not None and model.model_width != width:
        raise ModelValidationError(
            f"{model.key}: the model takes {model.model_width} features but its card lists "
            f"{width} ({', '.join(model.feature_names[:10])})"
        )
    rows = []
    if model.input_example is not None:
        if model.input_example.ndim != 2 or model.input_example.shape[1] != width:
            raise ModelValidationError(
                f"{model.key}: the input example has shape {model.input_example.shape}, the "
                f"model takes {width} features"
            )
        rows.append(model.input_example)
    if model.feature_spec is not None and model.handles_missing:
        # Carrara models handle missing values by design and live events will have them.
        rows.append(np.full((1, width), np.nan))
    if not rows:
        rows.append(np.zeros((1, width)))
    x = np.vstack(rows).astype(np.float64)
    try:
        scores = np.asarray(model.scores(x))
    except Exception as exc:
        raise ModelValidationError(
            f"{model.key}: scoring {len(x)} example rows failed: {type(exc).__name__}: {exc}"
        ) from exc
    _check_scores(model, x, scores)
    try:
        labels = model.labels(scores)
    except Exception as exc:
        raise ModelValidationError(
            f"{model.key}: labelling the example scores failed: {type(exc).__name__}: {exc}"
        ) from exc
    if len(labels) != len(x):
        raise ModelValidationError(f"{model.key}: {len(labels)} labels for {len(x)} rows")


def _check_scores(model: LoadedModel, x: np.ndarray, scores: np.ndarray) -> None:
    n = len(x)
    if model.task == "multiclass":
        columns = len(model.classes) if model.classes else None
        if scores.ndim != 2 or scores.shape[0] != n or (columns and scores.shape[1] != columns):
            raise ModelValidationError(
                f"{model.key}: a multiclass model must score ({n}, {columns or 'classes'}), got "
                f"shape {scores.shape}"
            )
    elif scores.shape != (n,):
        raise ModelValidationError(
            f"{model.key}: a {model.task} model must score ({n},), got shape {scores.shape}"
        )
    if scores.dtype.kind not in "fiub" or not np.all(np.isfinite(scores)):
        raise ModelValidationError(
            f"{model.key}: the example scores are not all finite numbers: {scores[:5]!r}"
        )
    if model.task in ("binary", "multiclass") and (np.any(scores < 0) or np.any(scores > 1)):
        raise ModelValidationError(f"{model.key}: probabilities outside [0, 1]: {scores[:5]!r}")
    if model.task == "multiclass":
        sums = scores.sum(axis=1)
        if not np.allclose(sums, 1.0, atol=PROBABILITY_SUM_TOLERANCE):
            raise ModelValidationError(
                f"{model.key}: class probabilities do not sum to 1 (row sums {sums[:5]!r})"
            )


# --- cache ----------------------------------------------------------------------------------


class ModelCache:
    """Loaded and validated model versions, each loaded once per (name, version); thread-safe."""

    def __init__(self, tracking_uri: str, *, prefer_onnx: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.prefer_onnx = prefer_onnx
        self._lock = threading.Lock()
        self._models: dict[tuple[str, int], LoadedModel] = {}
        # One lock per version being loaded: concurrent gets of one version wait for a single
        # load, while different versions load in parallel.
        self._loading: dict[tuple[str, int], threading.Lock] = {}

    def get(
        self,
        name: str,
        version: int,
        *,
        digests: dict[str, str] | None = None,
        trusted_code: bool = False,
    ) -> LoadedModel:
        """The version, loaded and validated on first use; raises ModelLoad/ValidationError.

        A cached model is reused only for the same expectations (pinned `digests`, trust);
        otherwise the version is loaded (and verified) again and replaces it.
        """
        key = (name, _version_number(name, version))

        def fits(model: LoadedModel | None) -> bool:
            return (
                model is not None
                and model.digests == digests
                and model.trusted_code == trusted_code
            )

        with self._lock:
            model = self._models.get(key)
            if model is not None and fits(model):
                return model
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                model = self._models.get(key)
            if model is not None and fits(model):
                return model
            # A failure is not cached: the next get retries (the server may have been down).
            model = load_model_version(
                self.tracking_uri,
                name,
                key[1],
                prefer_onnx=self.prefer_onnx,
                digests=digests,
                trusted_code=trusted_code,
            )
            validate(model)
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
            return model

    def retain(self, keys: Iterable[tuple[str, int]]) -> list[str]:
        """Evict every version not in `keys`; returns the evicted "name/version" keys."""
        # Models already handed out keep serving until their holders drop them; a get still
        # loading when this runs inserts afterwards, and the next retain evicts it.
        keep = {(name, int(version)) for name, version in keys}
        with self._lock:
            evicted = sorted(k for k in self._models if k not in keep)
            for k in evicted:
                del self._models[k]
        if evicted:
            log.info("model versions evicted", models=[f"{n}/{v}" for n, v in evicted])
        return [f"{n}/{v}" for n, v in evicted]

    def loaded(self) -> list[str]:
        """The cached versions as "name/version", sorted."""
        with self._lock:
            return [f"{n}/{v}" for n, v in sorted(self._models)]
