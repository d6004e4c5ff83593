"""Log a training run to MLflow and register its model version.

What lands in MLflow for every run (an experiment per dataset, `carrara/<dataset>`):
params, metrics (with their baselines), lineage tags (dataset, version, topic, per-partition
offsets), the snapshot as an MLflow dataset input, evaluation plots and feature importances, the
native model with signature and input example, `carrara_model.json` (features, task, classes,
threshold: what a scorer needs to encode events and read scores), and an ONNX artifact when the
parity check passed. The native model is registered as a new version of the run's registered model;
version tags point to the ONNX artifact so scorers can prefer it, and the SHA-256 of every file a
scorer may load is pinned right after (carrara.artifacts), to be stored with the version.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # workers have no display

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import orjson
from mlflow import MlflowClient
from mlflow.data import numpy_dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.models import infer_signature

from carrara.artifacts import SKOPS_ALLOWED_TYPES, refused_skops_types
from carrara.registry.mlflow_sync import pin_version
from carrara.training.onnx_export import OnnxExport
from carrara.training.trainers import TrainedModel

ONNX_ARTIFACT = "onnx/model.onnx"
MODEL_CARD_ARTIFACT = "carrara_model.json"
# Pinned requirements: inferring them costs 7-10 s per model (benchmarks/RESULTS.md), and the
# scorer image has these libraries anyway.
PIP_REQUIREMENTS = {
    "sklearn": ["scikit-learn", "numpy"],
    "lightgbm": ["lightgbm", "scikit-learn", "numpy"],
    "xgboost": ["xgboost-cpu", "scikit-learn", "numpy"],
}
# skops refuses to load types it does not know. The types a model may hold beyond skops' own
# defaults are Carrara's fixed allow-list (carrara.artifacts), the very list scorers load with:
# a model with any other type is refused here, at training, rather than at deployment.


class KafkaSnapshotSource(DatasetSource):
    """An MLflow dataset source naming a Kafka topic and the exact offsets a run replayed."""

    def __init__(self, topic: str, offsets: list[dict[str, int]]) -> None:
        self.topic = topic
        self.offsets = offsets

    @staticmethod
    def _get_source_type() -> str:
        return "kafka"

    def load(self) -> Any:
        raise NotImplementedError("replay the snapshot with carrara.streams.replay instead")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> KafkaSnapshotSource:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "offsets": self.offsets}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> KafkaSnapshotSource:
        return cls(source_dict["topic"], source_dict["offsets"])


class UntrustedModelTypes(RuntimeError):
    """The model contains types outside carrara.artifacts.SKOPS_ALLOWED_TYPES; it is not logged."""


@dataclass(frozen=True)
class Lineage:
    dataset: str
    dataset_version: int
    topic: str
    offsets: list[dict[str, int]]
    event_count: int
    carrara_run_id: int
    # The feature-set revision the run computed ({revision, digest}); None: raw fields only.
    feature_set: dict[str, Any] | None = None


@dataclass(frozen=True)
class LoggedModel:
    mlflow_run_id: str
    run_url: str
    registered_model_name: str
    version: int
    source: str
    onnx: bool
    # SHA-256 of every file a scorer may load, pinned right after registration.
    artifact_digests: dict[str, str] | None = None


def experiment_name(dataset: str) -> str:
    return f"carrara/{dataset}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def lineage_tags(lineage: Lineage) -> dict[str, str]:
    offsets = ",".join(f"{o['partition']}:{o['start']}-{o['end']}" for o in lineage.offsets)
    return {
        "carrara.dataset": lineage.dataset,
        "carrara.dataset_version": str(lineage.dataset_version),
        "carrara.topic": lineage.topic,
        "carrara.offsets": offsets,
        "carrara.event_count": str(lineage.event_count),
        "carrara.run_id": str(lineage.carrara_run_id),
    } | (
        {}
        if lineage.feature_set is None
        else {
            "carrara.feature_set_revision": str(lineage.feature_set["revision"]),
            "carrara.feature_set_digest": str(lineage.feature_set["digest"]),
        }
    )


def trusted_skops_types(model: Any) -> list[str]:
    """The skops types of `model` beyond skops' defaults; all must be in Carrara's allow-list."""
    import skops.io

    untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    refused = refused_skops_types(untrusted)
    if refused:
        raise UntrustedModelTypes(
            f"refusing to serialise types scorers would not load: {', '.join(refused)} "
            f"(allowed: {', '.join(sorted(SKOPS_ALLOWED_TYPES))})"
        )
    return list(untrusted)


@contextmanager
def _figure() -> Iterator[Any]:
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        yield fig, ax
    finally:
        plt.close(fig)


def _log_plots(
    trained: TrainedModel,
    feature_names: list[str],
    holdout_x: np.ndarray,
    holdout_y: np.ndarray | None,
) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    if holdout_y is not None and len(holdout_y) and trained.task in ("binary", "multiclass"):
        labels = trained.labels(holdout_x)
        with _figure() as (fig, ax):
            ConfusionMatrixDisplay.from_predictions(holdout_y, labels, ax=ax, colorbar=False)
            ax.set_title("Confusion matrix (holdout)")
            mlflow.log_figure(fig, "plots/confusion_matrix.png")
        if trained.task == "binary" and len(set(holdout_y.tolist())) == 2:
            with _figure() as (fig, ax):
                RocCurveDisplay.from_predictions(holdout_y, trained.scores(holdout_x), ax=ax)
                ax.set_title("ROC (holdout)")
                mlflow.log_figure(fig, "plots/roc.png")
    importances = trained.feature_importances()
    if importances is not None and len(importances) == len(feature_names):
        mlflow.log_dict(
            dict(zip(feature_names, importances.tolist(), strict=True)), "feature_importances.json"
        )
        order = np.argsort(importances)[-20:]
        with _figure() as (fig, ax):
            ax.barh([feature_names[i] for i in order], importances[order])
            ax.set_title("Feature importance")
            fig.tight_layout()
            mlflow.log_figure(fig, "plots/feature_importance.png")


def _log_native_model(trained: TrainedModel, input_example: np.ndarray) -> Any:
    signature = infer_signature(input_example, trained.scores(input_example))
    common: dict[str, Any] = {
        "name": "model",
        "signature": signature,
        "input_example": input_example,
        "pip_requirements": PIP_REQUIREMENTS[trained.flavor],
    }
    # Flavours import on first use (as `mlflow.<flavour>` would), named so a type checker sees them.
    if trained.flavor == "lightgbm":
        import mlflow.lightgbm as mlflow_lightgbm

        return mlflow_lightgbm.log_model(
            trained.estimator,
            skops_trusted_types=trusted_skops_types(trained.estimator),
            **common,
        )
    if trained.flavor == "xgboost":
        import mlflow.xgboost as mlflow_xgboost

        return mlflow_xgboost.log_model(trained.estimator, **common)
    import mlflow.sklearn as mlflow_sklearn

    return mlflow_sklearn.log_model(
        trained.estimator, skops_trusted_types=trusted_skops_types(trained.estimator), **common
    )


def model_card(
    trained: TrainedModel, feature_names: list[str], feature_spec: dict[str, Any]
) -> dict[str, Any]:
    """What a scorer needs besides the model: how to build the input row and read the output."""
    return {
        "format": 1,
        "algorithm": trained.algorithm,
        "task": trained.task,
        "flavor": trained.flavor,
        "feature_names": feature_names,
        "feature_spec": feature_spec,
        "classes": trained.classes,
        "threshold": trained.threshold,
        "score": {
            "binary": "probability of the positive class",
            "multiclass": "probability per class",
            "regression": "predicted value",
            "anomaly": "reconstruction error; alert when above threshold",
        }["anomaly" if trained.algorithm == "autoencoder" else trained.task],
    }


def log_and_register(
    *,
    tracking_uri: str,
    registered_model_name: str,
    lineage: Lineage,
    algorithm: str,
    params: dict[str, Any],
    metrics: dict[str, float | None],
    trained: TrainedModel,
    feature_names: list[str],
    feature_spec: dict[str, Any],
    holdout_x: np.ndarray,
    holdout_y: np.ndarray | None,
    onnx: OnnxExport,
    extra_artifacts: dict[str, Any] | None = None,
    child_runs: list[dict[str, Any]] | None = None,
) -> LoggedModel:
    """Create the MLflow run with everything listed in the module docstring; register the model."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(experiment_name(lineage.dataset))
    tags = lineage_tags(lineage) | {"carrara.algorithm": algorithm}
    with mlflow.start_run(run_name=f"run-{lineage.carrara_run_id}", tags=tags) as run:
        mlflow.log_params(
            {k: _param_value(v) for k, v in params.items()} | {"algorithm": algorithm}
        )
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        source = KafkaSnapshotSource(lineage.topic, lineage.offsets)
        mlflow.log_input(
            numpy_dataset.from_numpy(
                holdout_x[:0] if len(holdout_x) == 0 else holdout_x[:1000],
                source=source,
                name=f"{lineage.dataset}@v{lineage.dataset_version}",
                digest=f"{lineage.dataset}-v{lineage.dataset_version}",
            ),
            context="training",
        )
        mlflow.log_dict(model_card(trained, feature_names, feature_spec), MODEL_CARD_ARTIFACT)
        for name, payload in (extra_artifacts or {}).items():
            mlflow.log_dict(payload, name)
        _log_plots(trained, feature_names, holdout_x, holdout_y)
        for child in child_runs or []:
            with mlflow.start_run(run_name=child["name"], nested=True):
                mlflow.log_params({k: _param_value(v) for k, v in child["params"].items()})
                mlflow.log_metrics(
                    {k: float(v) for k, v in child["metrics"].items() if v is not None}
                )
        example = (
            np.nan_to_num(holdout_x[:5]) if len(holdout_x) else np.zeros((1, trained.n_features))
        )
        info = _log_native_model(trained, example)
        if onnx.model_bytes is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                path.write_bytes(onnx.model_bytes)
                mlflow.log_artifact(str(path), artifact_path="onnx")
        if onnx.max_abs_diff is not None:
            mlflow.log_metric("onnx_parity_max_abs_diff", onnx.max_abs_diff)
        run_id = run.info.run_id
    version = mlflow.register_model(
        info.model_uri,
        registered_model_name,
        tags={
            "carrara.run_id": str(lineage.carrara_run_id),
            "carrara.onnx": "true" if onnx.model_bytes is not None else "false",
            "carrara.onnx_artifact": f"runs:/{run_id}/{ONNX_ARTIFACT}" if onnx.model_bytes else "",
            "carrara.model_card": f"runs:/{run_id}/{MODEL_CARD_ARTIFACT}",
        },
    )
    MlflowClient(tracking_uri).set_model_version_tag(
        registered_model_name, version.version, "carrara.algorithm", algorithm
    )
    digests = pin_version(tracking_uri, registered_model_name, int(version.version))
    return LoggedModel(
        mlflow_run_id=run_id,
        run_url=run_url(tracking_uri, experiment.experiment_id, run_id),
        registered_model_name=registered_model_name,
        version=int(version.version),
        source=info.model_uri,
        onnx=onnx.model_bytes is not None,
        artifact_digests=digests,
    )


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()[:6000]
