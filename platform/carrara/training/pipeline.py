"""The training pipeline of one run: replay its snapshot, decode, split, train, evaluate, export
to ONNX, and log and register the model in MLflow. No database access: the worker's `lease`
records what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from carrara.settings import Settings
from carrara.streams.replay import replay_snapshot


class Heartbeat(Protocol):
    """What the pipeline needs of the worker's heartbeat (`lease.Heartbeat`)."""

    progress: int

    def beat(self) -> None:
        """Beat now (after a long step)."""

    def check(self) -> None:
        """A checkpoint: raise `lease.RunStopped` if the run is no longer this worker's."""


@dataclass(frozen=True)
class Job:
    """Everything the worker needs, copied out of the database so no ORM object is held."""

    run_id: int
    attempt: int
    algorithm: str
    params: dict[str, Any]
    holdout: dict[str, Any]
    registered_model_name: str
    dataset: str
    dataset_version: int
    topic: str
    offsets: list[dict[str, int]]
    event_count: int
    schema: dict[str, Any]
    # The dataset's feature-set revision pinned when the run was created ({number, sql,
    # late_policy, allowed_lateness_ms, digest}); None: raw fields only.
    feature_set: dict[str, Any] | None = None


@dataclass
class Outcome:
    metrics: dict[str, Any]
    results: dict[str, Any]
    mlflow_run_id: str
    mlflow_url: str
    registered_model_name: str
    version: int
    source: str
    events_read: int
    feature_profile: dict[str, Any] | None = None
    artifact_digests: dict[str, str] | None = None


def execute(job: Job, settings: Settings, heartbeat: Heartbeat) -> Outcome:
    """Replay, decode, split, train, evaluate, export and log one run."""
    from carrara.streams.event_codec import (
        FeatureError,
        check_bad_event_threshold,
        fit_feature_spec,
    )
    from carrara.training.holdout import holdout_mask

    decoded = _replay(job, settings, heartbeat)
    results: dict[str, Any] = {"bad_events": decoded.bad.as_dict(), "attempt": job.attempt}
    derived = _derive(job, settings, heartbeat, decoded) if job.feature_set else None
    check_bad_event_threshold(decoded.bad, decoded.total, job.params["bad_event_threshold"])
    if decoded.rows == 0:
        raise FeatureError(f"the snapshot holds no usable events ({decoded.total} read)")

    holdout = {
        "by": "time" if job.holdout.get("method") == "time" else "key",
        "fraction": job.holdout.get("fraction", 0.2),
        "seed": job.holdout.get("seed", 0),
    }
    keys = cast("list[str]", decoded.keys)  # a training decoder turns every key into text
    mask = holdout_mask(holdout, keys=keys, event_times=decoded.event_times)
    spec = fit_feature_spec(decoded, ~mask)
    features = spec.transform(decoded)
    feature_names = list(spec.columns)
    feature_spec = spec.as_dict()
    if derived is not None:
        from carrara.features.plan import COLUMN_PREFIX
        from carrara.training.features import feature_set_record

        assert job.feature_set is not None
        features = np.hstack([features, derived.matrix])
        feature_names += [COLUMN_PREFIX + name for name in derived.plan.names]
        feature_spec["feature_set"] = feature_set_record(job.feature_set, derived)
        results["feature_set"] = {
            "revision": job.feature_set["number"],
            "digest": job.feature_set["digest"],
            "warmup": derived.warmup,
            "warmup_events": derived.warmup_events,
            "late_events": derived.late_events,
        }
    labels = spec.encode_labels(decoded)
    train_x, hold_x = features[~mask], features[mask]
    train_y = None if labels is None else labels[~mask]
    hold_y = None if labels is None else labels[mask]
    results["rows"] = {"train": len(train_x), "holdout": len(hold_x)}
    feature_profile = _feature_profile(decoded, ~mask, spec, job)
    if len(train_x) == 0:
        raise FeatureError("the holdout took every event: nothing is left to train on")
    task = job.schema["task"]
    heartbeat.check()

    train_keys = [k for k, held in zip(keys, mask, strict=True) if not held]
    trained, child_runs = _train(job, task, train_x, train_y, train_keys, results, heartbeat)
    heartbeat.check()

    metrics = _evaluate(trained, task, hold_x, hold_y, train_y)
    from carrara.training.onnx_export import export_onnx

    onnx = export_onnx(trained, hold_x if len(hold_x) else train_x[:500])
    results["onnx"] = {
        "exported": onnx.model_bytes is not None,
        "skipped_reason": onnx.skipped_reason,
        "max_abs_diff": onnx.max_abs_diff,
    }
    if trained.threshold is not None:
        results["threshold"] = trained.threshold
    heartbeat.check()

    from carrara.training.mlflow_logging import Lineage, log_and_register

    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=job.registered_model_name,
        lineage=Lineage(
            dataset=job.dataset,
            dataset_version=job.dataset_version,
            topic=job.topic,
            offsets=job.offsets,
            event_count=job.event_count,
            carrara_run_id=job.run_id,
            feature_set=None
            if job.feature_set is None
            else {"revision": job.feature_set["number"], "digest": job.feature_set["digest"]},
        ),
        algorithm=job.algorithm,
        params=job.params
        | (
            {}
            if job.feature_set is None
            else {
                "feature_set_revision": job.feature_set["number"],
                "feature_set_digest": job.feature_set["digest"],
            }
        ),
        metrics=metrics,
        trained=trained,
        feature_names=feature_names,
        feature_spec=feature_spec,
        holdout_x=hold_x,
        holdout_y=hold_y if hold_y is not None and task != "regression" else None,
        onnx=onnx,
        extra_artifacts={"results.json": results}
        | ({} if job.feature_set is None else {"feature_set.json": feature_spec["feature_set"]}),
        child_runs=child_runs,
    )
    return Outcome(
        metrics=metrics,
        results=results,
        mlflow_run_id=logged.mlflow_run_id,
        mlflow_url=logged.run_url,
        registered_model_name=logged.registered_model_name,
        version=logged.version,
        source=logged.source,
        events_read=job.event_count,
        feature_profile=feature_profile,
        artifact_digests=logged.artifact_digests,
    )


def _replay(job: Job, settings: Settings, heartbeat: Heartbeat) -> Any:
    """The snapshot's events replayed from Kafka and decoded (progress goes to the heartbeat)."""
    from carrara.streams.event_codec import EventDecoder

    def on_progress(read: int, _total: int) -> None:
        heartbeat.progress = read

    decoder = EventDecoder(job.schema)
    for batch in replay_snapshot(
        settings.kafka_bootstrap, job.topic, job.offsets, on_progress=on_progress
    ):
        decoder.add_batch(batch.values, batch.partitions, batch.offsets)
        heartbeat.check()
    decoded = decoder.result()
    heartbeat.beat()
    heartbeat.check()
    return decoded


def _derive(job: Job, settings: Settings, heartbeat: Heartbeat, decoded: Any) -> Any:
    """The run's derived features through the feature operator, warmed from the horizon before
    the snapshot (README: Features in SQL)."""
    from carrara.features.plan import FeatureSqlError
    from carrara.streams.event_codec import EventDecoder, FeatureError
    from carrara.streams.warmup import warmup_ranges
    from carrara.training.features import FeatureSetError, derive, plan_of

    assert job.feature_set is not None
    try:
        plan = plan_of(job.feature_set, job.schema, job.dataset)
    except (FeatureSqlError, FeatureSetError) as exc:
        raise FeatureError(f"feature set: {exc}") from exc
    warm = [
        r.as_dict()
        for r in warmup_ranges(settings.kafka_bootstrap, job.topic, job.offsets, plan.horizon_ms)
    ]
    warm_decoded = None
    if warm:
        decoder = EventDecoder(job.schema)
        for batch in replay_snapshot(settings.kafka_bootstrap, job.topic, warm):
            decoder.add_batch(batch.values, batch.partitions, batch.offsets)
            heartbeat.check()
        warm_decoded = decoder.result()
    derived = derive(plan, warm_decoded, warm, decoded)
    heartbeat.beat()
    return derived


def _train(
    job: Job,
    task: str,
    train_x: np.ndarray,
    train_y: np.ndarray | None,
    train_keys: list[str],
    results: dict[str, Any],
    heartbeat: Heartbeat,
) -> tuple[Any, list[dict[str, Any]]]:
    """The trained model, and the MLflow child runs to log (AutoML's trials; none otherwise)."""
    if job.algorithm != "auto":
        from carrara.training.trainers import train

        if job.algorithm == "autoencoder":
            return train(job.algorithm, "anomaly", job.params, train_x, None), []
        return train(job.algorithm, task, job.params, train_x, train_y), []

    from carrara.training.automl import search
    from carrara.training.holdout import holdout_by_key

    valid = holdout_by_key(train_keys, 0.2, f"automl-{job.params['seed']}")
    assert train_y is not None
    result = search(
        task,
        job.params,
        train_x[~valid],
        train_y[~valid],
        train_x[valid],
        train_y[valid],
        on_trial=lambda _trial: heartbeat.check(),
    )
    results["leaderboard"] = [
        {
            "trial": t.number,
            "algorithm": t.algorithm,
            "params": t.params,
            f"validation_{result.metric}": t.score,
            "seconds": round(t.seconds, 3),
            "error": t.error,
        }
        for t in result.leaderboard
    ]
    results["best"] = {"algorithm": result.best_trial.algorithm, "trial": result.best_trial.number}
    child_runs = [
        {
            "name": f"trial-{t.number}-{t.algorithm}",
            "params": {"algorithm": t.algorithm, **t.params},
            "metrics": {f"validation_{result.metric}": t.score, "seconds": t.seconds},
        }
        for t in result.leaderboard
    ]
    return result.best, child_runs


def _feature_profile(decoded: Any, train_rows: np.ndarray, spec: Any, job: Job) -> dict[str, Any]:
    """The training rows' distribution per feature: what the monitor measures drift against."""
    from carrara.monitoring.statistics import build_profile
    from carrara.streams.event_codec import NUMERIC_TYPES

    features: dict[str, Any] = {}
    numeric_index = 0
    for feature in decoded.schema.features:
        if feature.type in NUMERIC_TYPES:
            column = decoded.numeric[train_rows, numeric_index]
            numeric_index += 1
            features[feature.name] = build_profile(column, "numeric")
        elif str(feature.type) == "category":
            values = [
                v
                for v, keep in zip(decoded.categories[feature.name], train_rows, strict=True)
                if keep
            ]
            features[feature.name] = build_profile(values, "category")
    task = "anomaly" if job.algorithm == "autoencoder" else job.schema["task"]
    return {
        "task": task,
        "label_classes": None if spec.label_classes is None else list(spec.label_classes),
        "features": features,
    }


def _evaluate(
    trained: Any,
    task: str,
    hold_x: np.ndarray,
    hold_y: np.ndarray | None,
    train_y: np.ndarray | None,
) -> dict[str, Any]:
    from carrara.training.evaluation import evaluate

    if len(hold_x) == 0:
        return {"holdout_rows": 0}
    scores = trained.scores(hold_x)
    if trained.algorithm == "autoencoder":
        truth = hold_y if hold_y is not None else np.full(len(hold_x), np.nan)
        metrics = evaluate("anomaly", truth, scores, threshold=trained.threshold)
    else:
        metrics = evaluate(task, hold_y, scores, y_train=train_y)
    return {**metrics, "holdout_rows": len(hold_x)}
