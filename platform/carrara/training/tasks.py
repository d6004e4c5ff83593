"""The training task: one Celery task per run, a pure function of (snapshot, algorithm, params).

Safety rules, in the order the code applies them:
- *Claim under a row lock.* A finished run is never reopened; a run whose worker is alive (fresh
  heartbeat) is left to it, so a duplicated or redelivered task trains nothing.
- *Heartbeat.* While it works, the worker writes `heartbeat_at` (and progress) every few seconds
  with a conditional UPDATE that matches only while the run is still `running` on this worker.
  When it stops matching (cancelled, or re-queued after being presumed lost), the worker stops at
  its next checkpoint and writes nothing more.
- *Lost workers.* A worker killed with SIGKILL stops beating; the control plane's reaper
  (`training.reaper`) re-queues the run or, after `training_max_attempts` starts, fails it. A
  run is never left `running` forever.
- *Failures are data.* Anything that goes wrong inside the run (bad events over the threshold, no
  usable rows, a library error) marks the run `failed` with the reason; the task itself succeeds.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
import structlog
from celery.signals import worker_process_init
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from carrara.db import engine_for
from carrara.errors import NotFound
from carrara.models import TrainingRun
from carrara.models.training import FINISHED_STATES
from carrara.settings import Settings, get_settings
from carrara.streams.replay import replay_snapshot
from carrara.training import service
from carrara.training.worker import app

log = structlog.get_logger(__name__)


class RunStopped(Exception):
    """The run left `running` on this worker (cancelled or re-queued) while we worked."""


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


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked pool process must not share the parent's database connections."""
    engine_for.cache_clear()


def _sessions(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(settings.database_url), expire_on_commit=False)


def claim_run(
    sessions: sessionmaker[Session], run_id: int, worker: str, settings: Settings
) -> Job | None:
    """Take the run for this worker, or None when there is nothing (more) to do."""
    with sessions() as session, session.begin():
        try:
            run = service.get_run(session, run_id, for_update=True)
        except NotFound:
            log.warning("training task for a run that does not exist", run_id=run_id)
            return None
        if run.status in FINISHED_STATES:
            log.info("run already finished; nothing to do", run_id=run_id, status=run.status)
            return None
        now = datetime.now(UTC)
        timeout = timedelta(seconds=settings.run_heartbeat_timeout_s)
        if run.status == "running" and run.heartbeat_at and now - run.heartbeat_at < timeout:
            log.info("run is being trained by a live worker", run_id=run_id, worker=run.worker)
            return None
        if run.attempts >= settings.training_max_attempts:
            service.mark_failed(
                session,
                run,
                f"gave up after {run.attempts} attempts: the worker training this run stopped "
                "sending heartbeats each time (killed, out of memory, or the machine was lost)",
            )
            return None
        run.attempts += 1
        run.worker = worker
        run.error = None
        if run.status == "queued":
            service.mark_running(session, run)
        else:  # running with a stale heartbeat: its worker died and the task was redelivered
            run.started_at = run.heartbeat_at = now
        version = run.dataset_version
        dataset = version.dataset
        return Job(
            run_id=run.id,
            attempt=run.attempts,
            algorithm=run.algorithm,
            params=dict(run.params),
            holdout=dict(run.holdout),
            registered_model_name=run.registered_model_name,
            dataset=dataset.name,
            dataset_version=version.number,
            topic=dataset.topic,
            offsets=list(version.offsets),
            event_count=version.event_count,
            schema={
                "key_field": dataset.key_field,
                "event_time_field": dataset.event_time_field,
                "label_field": dataset.label_field,
                "task": dataset.task,
                "features": dataset.features,
            },
        )


@dataclass
class Heartbeat:
    """Beats (heartbeat + progress) from a thread; `stopped` is set once the run is not ours."""

    sessions: sessionmaker[Session]
    run_id: int
    worker: str
    interval: float
    progress: int = 0
    stopped: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="run-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def beat(self) -> None:
        """One conditional UPDATE: only while the run is running on this worker."""
        with self.sessions() as session, session.begin():
            result = session.execute(
                update(TrainingRun)
                .where(
                    TrainingRun.id == self.run_id,
                    TrainingRun.status == "running",
                    TrainingRun.worker == self.worker,
                )
                .values(heartbeat_at=datetime.now(UTC), events_replayed=self.progress)
            )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            self.stopped.set()

    def check(self) -> None:
        """A checkpoint: raise RunStopped if the run is no longer ours."""
        if self.stopped.is_set():
            raise RunStopped

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except Exception:  # a database hiccup must not kill the run; the next beat retries
                log.exception("heartbeat failed", run_id=self.run_id)


def execute(job: Job, settings: Settings, heartbeat: Heartbeat) -> Outcome:
    """Replay, decode, split, train, evaluate, export and log one run."""
    from carrara.streams.event_codec import (
        EventDecoder,
        FeatureError,
        check_bad_event_threshold,
        fit_feature_spec,
    )
    from carrara.training.holdout import holdout_by_key, holdout_mask

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
    results: dict[str, Any] = {"bad_events": decoded.bad.as_dict(), "attempt": job.attempt}
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

    child_runs: list[dict[str, Any]] = []
    if job.algorithm == "auto":
        from carrara.training.automl import search

        train_keys = [k for k, held in zip(keys, mask, strict=True) if not held]
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
        trained = result.best
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
        results["best"] = {
            "algorithm": result.best_trial.algorithm,
            "trial": result.best_trial.number,
        }
        child_runs = [
            {
                "name": f"trial-{t.number}-{t.algorithm}",
                "params": {"algorithm": t.algorithm, **t.params},
                "metrics": {f"validation_{result.metric}": t.score, "seconds": t.seconds},
            }
            for t in result.leaderboard
        ]
    else:
        from carrara.training.trainers import train

        if job.algorithm == "autoencoder":
            trained = train(job.algorithm, "anomaly", job.params, train_x, None)
        else:
            trained = train(job.algorithm, task, job.params, train_x, train_y)
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
        ),
        algorithm=job.algorithm,
        params=job.params,
        metrics=metrics,
        trained=trained,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=hold_x,
        holdout_y=hold_y if hold_y is not None and task != "regression" else None,
        onnx=onnx,
        extra_artifacts={"results.json": results},
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
    )


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


def finish_run(sessions: sessionmaker[Session], job: Job, worker: str, outcome: Outcome) -> bool:
    """Record success, unless the run stopped being ours meanwhile; True if recorded."""
    from carrara.registry.service import register_version

    with sessions() as session, session.begin():
        run = service.get_run(session, job.run_id, for_update=True)
        if run.status != "running" or run.worker != worker:
            return False
        version = register_version(
            session,
            outcome.registered_model_name,
            outcome.version,
            run.id,
            outcome.source,
            outcome.metrics,
        )
        version.feature_profile = service._json_safe(outcome.feature_profile)
        session.flush()
        run.events_replayed = outcome.events_read
        run.results = service._json_safe(outcome.results)
        service.mark_succeeded(
            session, run, outcome.metrics, outcome.mlflow_run_id, outcome.mlflow_url, version.id
        )
    return True


def fail_run(sessions: sessionmaker[Session], job: Job, worker: str, reason: str) -> None:
    """Record the failure, unless the run stopped being ours meanwhile."""
    with sessions() as session, session.begin():
        run = service.get_run(session, job.run_id, for_update=True)
        if run.status == "running" and run.worker == worker:
            service.mark_failed(session, run, reason)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@app.task(name=service.TRAIN_TASK, bind=True)
def train_run(self: Any, run_id: int) -> dict[str, Any]:
    """Train run `run_id` (see the module docstring for the safety rules)."""
    settings = get_settings()
    worker = f"{self.request.hostname or socket.gethostname()}:{self.request.id}"[:200]
    sessions = _sessions(settings)
    job = claim_run(sessions, run_id, worker, settings)
    if job is None:
        return {"run_id": run_id, "status": "skipped"}
    log.info("training started", run_id=run_id, algorithm=job.algorithm, attempt=job.attempt)
    heartbeat = Heartbeat(sessions, run_id, worker, settings.run_heartbeat_interval_s)
    heartbeat.start()
    started = time.monotonic()
    try:
        outcome = execute(job, settings, heartbeat)
    except RunStopped:
        log.info("run stopped while training (cancelled or re-queued)", run_id=run_id)
        return {"run_id": run_id, "status": "stopped"}
    except Exception as exc:
        log.exception("training failed", run_id=run_id)
        fail_run(sessions, job, worker, _describe(exc))
        return {"run_id": run_id, "status": "failed"}
    finally:
        heartbeat.stop()
    recorded = finish_run(sessions, job, worker, outcome)
    log.info(
        "training finished",
        run_id=run_id,
        recorded=recorded,
        seconds=round(time.monotonic() - started, 2),
        model=f"{outcome.registered_model_name}/{outcome.version}",
    )
    return {"run_id": run_id, "status": "succeeded" if recorded else "stopped"}
