"""The control plane's calls to MLflow's model registry, with MLflow failures as domain errors.

MLflow stays the store of artifacts and the registry of record for aliases; Carrara mirrors what
it needs (versions, lineage, aliases). Every call here either succeeds, raises NotFound when MLflow
says the thing does not exist, or raises Unavailable (503) when MLflow cannot answer.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from carrara.artifacts import CARD_KEY, ONNX_KEY, directory_digests, sha256_file
from carrara.errors import Invalid, NotFound, Unavailable

T = TypeVar("T")

# MLflow's client retries a failing server 7 times with exponential backoff (minutes). An API
# request must fail fast with a 503 instead, so the control plane lowers the defaults for its own
# process, unless the operator set them explicitly.
_FAST_FAIL_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


@dataclass(frozen=True)
class MlflowVersion:
    """What Carrara keeps of an MLflow model version."""

    name: str
    version: int
    source: str
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def registry_client(mlflow_url: str) -> MlflowClient:
    """An MLflow client for the tracking server and registry at `mlflow_url`."""
    for name, value in _FAST_FAIL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"MLflow has no {what}") from exc
        if exc.error_code == "INVALID_PARAMETER_VALUE" or 400 <= status < 500:
            raise Invalid(f"MLflow refused {what}: {exc.message}") from exc
        raise Unavailable(f"MLflow cannot answer about {what}: {exc.message}") from exc
    except OSError as exc:  # connection errors that escape MLflow's own wrapping
        raise Unavailable(f"MLflow is unreachable ({what}): {exc}") from exc


# For other modules' MLflow calls: MLflow failures as NotFound, Invalid or Unavailable.
translated = _translated


def _call(what: str, fn: Callable[[], T]) -> T:
    with _translated(what):
        return fn()


def fetch_version(client: MlflowClient, name: str, version: int) -> MlflowVersion:
    """An MLflow model version and the metrics of the run that produced it."""
    what = f"version {version} of model '{name}'"
    mv = _call(what, lambda: client.get_model_version(name, str(version)))
    metrics: dict[str, float] = {}
    if run_id := mv.run_id:
        try:
            run = _call(f"run {run_id}", lambda: client.get_run(run_id))
            # JSON (and so JSONB) has no NaN or infinity; such metrics carry no information.
            metrics = {k: v for k, v in run.data.metrics.items() if math.isfinite(v)}
        except NotFound:
            # The run was deleted; the version (and its artifacts) still exist.
            metrics = {}
    return MlflowVersion(
        name=name,
        version=int(mv.version),
        source=mv.source or "",
        run_id=mv.run_id or None,
        aliases=list(mv.aliases or []),
        metrics=metrics,
    )


@dataclass(frozen=True)
class MlflowModel:
    """What Carrara keeps of an MLflow registered model."""

    name: str
    description: str
    aliases: dict[str, int]  # alias -> version
    versions: list[int]


def fetch_model(client: MlflowClient, name: str) -> MlflowModel:
    """MLflow's registered model `name`: description, aliases and version numbers."""
    what = f"registered model '{name}'"
    model = _call(what, lambda: client.get_registered_model(name))
    escaped = name.replace("'", "\\'")
    versions = _call(what, lambda: client.search_model_versions(f"name = '{escaped}'"))
    return MlflowModel(
        name=name,
        description=model.description or "",
        aliases={alias: int(v) for alias, v in (model.aliases or {}).items()},
        versions=sorted(int(v.version) for v in versions),
    )


def set_alias(client: MlflowClient, name: str, alias: str, version: int) -> None:
    """Point `alias` of model `name` at `version` in MLflow's registry (idempotent)."""
    _call(
        f"alias '{alias}' -> version {version} of model '{name}'",
        lambda: client.set_registered_model_alias(name, alias, str(version)),
    )


def delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    """Remove `alias` of model `name` from MLflow's registry; absent already is fine."""
    try:
        _call(
            f"alias '{alias}' of model '{name}'",
            lambda: client.delete_registered_model_alias(name, alias),
        )
    except NotFound:
        return


# Version tags naming the files a scorer reads besides the model directory (as training sets them).
TAG_MODEL_CARD = "carrara.model_card"
TAG_ONNX = "carrara.onnx"
TAG_ONNX_ARTIFACT = "carrara.onnx_artifact"
# As in the scorer: a tag may only name an artifact served by the tracking server.
ALLOWED_TAG_URI_PREFIXES = ("runs:/", "mlflow-artifacts:")


def pin_version(tracking_uri: str, name: str, version: int) -> dict[str, str]:
    """The digests of every file a scorer may load of `name`/`version` (see carrara.artifacts).

    Downloads the registered model directory, the model card and the ONNX export the version's
    tags name, as they are in MLflow now: call it when the version is registered.
    """
    client = registry_client(tracking_uri)
    what = f"version {version} of model '{name}'"
    mv = _call(what, lambda: client.get_model_version(name, str(version)))
    model_uri = _call(what, lambda: client.get_model_version_download_uri(name, str(version)))
    tags = dict(mv.tags or {})
    files = {CARD_KEY: tags.get(TAG_MODEL_CARD) or None}
    if tags.get(TAG_ONNX) == "true":
        files[ONNX_KEY] = tags.get(TAG_ONNX_ARTIFACT) or None
    with tempfile.TemporaryDirectory(prefix="carrara-pin-") as tmp:

        def fetch(uri: str, into: str) -> Path:
            destination = Path(tmp) / into
            destination.mkdir()
            return Path(
                _call(
                    f"artifacts of {what} ({uri})",
                    lambda: download_artifacts(
                        artifact_uri=uri,
                        dst_path=str(destination),
                        tracking_uri=tracking_uri,
                        registry_uri=tracking_uri,
                    ),
                )
            )

        root = fetch(model_uri, "model")
        digests = directory_digests(root) if root.is_dir() else {}
        for i, (key, uri) in enumerate(files.items()):
            if uri is None or not uri.startswith(ALLOWED_TAG_URI_PREFIXES):
                continue  # a scorer refuses such a version anyway
            path = fetch(uri, f"file-{i}")
            if path.is_file():
                digests[key] = sha256_file(path)
    return digests
