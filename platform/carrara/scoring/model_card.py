"""What the scorer knows of a model version before running it: its card (`carrara_model.json`),
the `LoadedModel` every runtime returns, and the `Fetcher` that downloads its artifacts from the
MLflow server and verifies them against the digests pinned at registration (carrara.artifacts).

Split from `model_runtime` (which loads, validates and caches versions) with `model_loaders`
(the runtimes), so each stays readable; see model_runtime's docstring for the trust rules.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import structlog
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from carrara.artifacts import (
    DigestMismatch,
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


class Fetcher:
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


def parse_card(key: str, raw: bytes) -> ModelCard:
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


def class_labels(card: ModelCard) -> list[Any] | None:
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


def loaded_model(
    fetch: Fetcher, card: ModelCard, runtime: RuntimeKind, **fields: Any
) -> LoadedModel:
    task: Task = "anomaly" if card.algorithm == "autoencoder" else card.task
    return LoadedModel(
        model_name=fetch.name,
        version=fetch.version,
        runtime=runtime,
        task=task,
        algorithm=card.algorithm,
        feature_names=list(card.feature_names),
        feature_spec=card.feature_spec,
        classes=class_labels(card),
        threshold=card.threshold,
        load_seconds=0.0,
        **fields,
    )


def read_mlmodel(key: str, directory: Path) -> Model:
    try:
        return Model.load(str(directory / "MLmodel"))
    except Exception as exc:  # YAML or schema errors of all kinds: the version is broken
        raise ModelLoadError(f"{key}: the MLmodel file cannot be read: {exc}") from exc


def input_example(
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
