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

import threading
import time
from collections.abc import Iterable

import numpy as np
import structlog
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from carrara.artifacts import (
    CARD_KEY,
)

# MLflow reads this at each download: tqdm bars on stderr would garble the structured logs.
from carrara.scoring.model_card import (
    PROBABILITY_SUM_TOLERANCE,
    TAG_ALGORITHM,
    TAG_MODEL_CARD,
    TAG_ONNX,
    TAG_ONNX_ARTIFACT,
    Fetcher,
    LoadedModel,
    ModelLoadError,
    ModelValidationError,
    parse_card,
)
from carrara.scoring.model_loaders import load_native, load_onnx, load_pyfunc

log = structlog.get_logger(__name__)

__all__ = [
    "LoadedModel",
    "ModelCache",
    "ModelLoadError",
    "ModelValidationError",
    "load_model_version",
    "validate",
]

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
    fetch = Fetcher(tracking_uri, name, number, digests, trusted_code)
    if digests is None:
        log.warning("model version loaded without pinned digests", model=key)
    card_uri = tags.get(TAG_MODEL_CARD)
    if card_uri:
        card = parse_card(key, fetch.read(card_uri, "model card", CARD_KEY))
        onnx_uri = tags.get(TAG_ONNX_ARTIFACT) if tags.get(TAG_ONNX) == "true" else None
        if prefer_onnx and onnx_uri and card.flavor != "onnx":
            loaded = load_onnx(fetch, card, model_uri, onnx_uri)
        else:
            loaded = load_native(fetch, card, model_uri)
    else:
        loaded = load_pyfunc(fetch, model_uri)
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
