"""Training runs: create (idempotently; the task is enqueued through the outbox), list, cancel, and
the state transitions the training worker drives.

States: queued -> running -> succeeded | failed | cancelled. A queued run may also be cancelled, or
failed by a worker that could not start it (so it never stays queued forever).
"""

from __future__ import annotations

from datetime import UTC, datetime
from math import isfinite
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from carrara.audit.service import record
from carrara.auth.principal import Principal
from carrara.auth.roles import Role
from carrara.errors import Conflict, Invalid, NotFound
from carrara.models import Dataset, DatasetVersion, FeatureSetRevision, TrainingRun
from carrara.models.training import FINISHED_STATES
from carrara.outbox.service import enqueue_task
from carrara.pagination import PageParams, paginate
from carrara.training.algorithms import ALGORITHMS, validate_params
from carrara.training.schemas import AlgorithmOut

TRAIN_TASK = "carrara.training.train_run"
# The actor of the audit events the training worker causes (it has no API token).
WORKER = Principal(token_id=None, name="training-worker", role=Role.editor)
MAX_ERROR_CHARS = 20_000

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    # running -> queued: the worker was lost (no heartbeat) and the run goes back to the queue.
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
# The audit action recorded for a move into each state.
ACTIONS = {
    "queued": "run.requeue",
    "running": "run.start",
    "succeeded": "run.succeed",
    "failed": "run.fail",
    "cancelled": "run.cancel",
}


def algorithms() -> list[AlgorithmOut]:
    """The algorithms runs can use: the tasks each supports and the JSON schema of its params."""
    return [
        AlgorithmOut(
            name=a.name,
            title=a.title,
            description=a.description,
            tasks=list(a.tasks),
            params_schema=a.params_schema(),
        )
        for a in ALGORITHMS.values()
    ]


def check_transition(run_id: int, current: str, target: str) -> None:
    """Raise Conflict unless a run in state `current` may move to `target`."""
    allowed = TRANSITIONS.get(current)
    if allowed is None:
        raise Conflict(f"run {run_id} is in unknown state {current!r}", run_status=current)
    if target in allowed:
        return
    if current in FINISHED_STATES:
        raise Conflict(
            f"run {run_id} is already {current}; a finished run cannot become {target}",
            run_status=current,
        )
    raise Conflict(
        f"run {run_id} is {current}; it cannot become {target} "
        f"(from {current} it may become {', '.join(sorted(allowed))})",
        run_status=current,
    )


def task_id_for(run_id: int) -> str:
    """The Celery task id of a run's training task (stable: redelivery never trains twice)."""
    return f"run-{run_id}"


def resolve_dataset_version(session: Session, dataset: str, number: int) -> DatasetVersion:
    """Version `number` of dataset `dataset`; 404 naming what is missing."""
    row = session.scalar(select(Dataset).where(Dataset.name == dataset))
    if row is None:
        raise NotFound(f"dataset {dataset!r} does not exist")
    version = session.scalar(
        select(DatasetVersion).where(
            DatasetVersion.dataset_id == row.id, DatasetVersion.number == number
        )
    )
    if version is None:
        latest = max((v.number for v in row.versions), default=None)
        known = f"its latest version is v{latest}" if latest else "it has no versions yet"
        raise NotFound(f"dataset {dataset!r} has no version {number}; {known}")
    return version


def _run_by_key(session: Session, key: str) -> TrainingRun | None:
    return session.scalar(select(TrainingRun).where(TrainingRun.idempotency_key == key))


def _replay(
    run: TrainingRun,
    key: str,
    dataset_version_id: int,
    algorithm: str,
    params: dict[str, Any],
    holdout: dict[str, Any],
    registered_model_name: str,
) -> TrainingRun:
    """The run an Idempotency-Key already created, if this request asks for the same run."""
    sent = {
        "dataset_version": dataset_version_id,
        "algorithm": algorithm,
        "params": params,
        "holdout": holdout,
        "registered_model_name": registered_model_name,
    }
    stored = {
        "dataset_version": run.dataset_version_id,
        "algorithm": run.algorithm,
        "params": run.params,
        "holdout": run.holdout,
        "registered_model_name": run.registered_model_name,
    }
    differing = [field for field in sent if sent[field] != stored[field]]
    if differing:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for run {run.id} with a different "
            f"request (different {', '.join(differing)}); use a new key for a new run",
            run_id=run.id,
            differing_fields=differing,
        )
    return run


def create_run(
    session: Session,
    principal: Principal,
    *,
    dataset: str,
    dataset_version: int,
    algorithm: str,
    params: dict[str, Any],
    holdout: dict[str, Any],
    registered_model_name: str,
    idempotency_key: str | None = None,
) -> tuple[TrainingRun, bool]:
    """Queue a training run and its Celery task (via the outbox); returns (run, newly created).

    With an idempotency key already used for the same request, returns that run and enqueues
    nothing; with the key used for a different request, raises Conflict.
    """
    version = resolve_dataset_version(session, dataset, dataset_version)
    ds = version.dataset
    validated = validate_params(algorithm, ds.task, params)
    if holdout.get("method") == "time" and not ds.event_time_field:
        raise Invalid(
            f"holdout method 'time' needs an event-time field and dataset {dataset!r} has none; "
            "use method 'hash'"
        )
    # The dataset's current feature set is pinned on the run: its training rows and the model
    # version carry exactly that revision's features.
    feature_set = session.scalar(
        select(FeatureSetRevision)
        .where(FeatureSetRevision.dataset_id == ds.id)
        .order_by(FeatureSetRevision.number.desc())
        .limit(1)
    )
    if feature_set is not None and not ds.event_time_field:
        raise Invalid(
            f"dataset {dataset!r} has a feature set but no event-time field: training over "
            "record timestamps is not built yet"
        )
    request = (version.id, algorithm, validated, holdout, registered_model_name)
    if idempotency_key is not None:
        existing = _run_by_key(session, idempotency_key)
        if existing is not None:
            return _replay(existing, idempotency_key, *request), False

    run = TrainingRun(
        dataset_version_id=version.id,
        algorithm=algorithm,
        params=validated,
        holdout=holdout,
        registered_model_name=registered_model_name,
        status="queued",
        events_total=version.event_count,
        events_replayed=0,
        metrics={},
        idempotency_key=idempotency_key,
        created_by=principal.name,
        feature_set_revision_id=None if feature_set is None else feature_set.id,
    )
    try:
        # A savepoint, so that losing a race on the idempotency key leaves the request's
        # transaction usable for reading the winner's run.
        with session.begin_nested():
            session.add(run)
            session.flush()
    except IntegrityError as exc:
        winner = _run_by_key(session, idempotency_key) if idempotency_key else None
        if winner is None:
            raise Conflict(f"the run could not be stored: {exc.orig}") from exc
        return _replay(winner, idempotency_key or "", *request), False

    enqueue_task(session, TRAIN_TASK, {"run_id": run.id}, task_id=task_id_for(run.id))
    record(
        session,
        principal,
        "run.create",
        "run",
        run.id,
        after={
            "dataset": dataset,
            "dataset_version": version.number,
            "algorithm": algorithm,
            "params": validated,
            "holdout": holdout,
            "registered_model_name": registered_model_name,
            "idempotency_key": idempotency_key,
        },
    )
    return run, True


def get_run(session: Session, run_id: int, *, for_update: bool = False) -> TrainingRun:
    """A run by id; `for_update` locks its row so state changes serialise (cancel vs worker)."""
    run = session.get(TrainingRun, run_id, with_for_update=for_update, populate_existing=for_update)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return run


def list_runs(
    session: Session,
    params: PageParams,
    *,
    status: str | None = None,
    dataset: str | None = None,
    algorithm: str | None = None,
    registered_model_name: str | None = None,
) -> tuple[list[TrainingRun], str | None]:
    """Runs, newest first, filtered by status, dataset name, algorithm and model name."""
    stmt = select(TrainingRun).options(
        joinedload(TrainingRun.dataset_version).joinedload(DatasetVersion.dataset)
    )
    if status:
        stmt = stmt.where(TrainingRun.status == status)
    if dataset:
        stmt = stmt.where(
            TrainingRun.dataset_version_id.in_(
                select(DatasetVersion.id)
                .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                .where(Dataset.name == dataset)
            )
        )
    if algorithm:
        stmt = stmt.where(TrainingRun.algorithm == algorithm)
    if registered_model_name:
        stmt = stmt.where(TrainingRun.registered_model_name == registered_model_name)
    return paginate(session, stmt, TrainingRun.id, params)


def _transition(session: Session, actor: Principal, run: TrainingRun, target: str) -> str:
    check_transition(run.id, run.status, target)
    before = run.status
    run.status = target
    record(
        session,
        actor,
        ACTIONS[target],
        "run",
        run.id,
        before={"status": before},
        after={"status": target},
    )
    return before


def cancel_run(session: Session, principal: Principal, run_id: int) -> TrainingRun:
    """Cancel a queued or running run; the worker sees the state and stops."""
    run = get_run(session, run_id, for_update=True)
    _transition(session, principal, run, "cancelled")
    run.finished_at = datetime.now(UTC)
    return run


def mark_running(session: Session, run: TrainingRun) -> TrainingRun:
    """Worker: the run started replaying its snapshot."""
    _transition(session, WORKER, run, "running")
    now = datetime.now(UTC)
    run.started_at = now
    run.heartbeat_at = now
    return run


def record_progress(session: Session, run: TrainingRun, replayed: int) -> TrainingRun:
    """Worker: `replayed` events read so far (also a heartbeat). Conflict once not running.

    Not audited: it is frequent and changes no state. The Conflict is how a worker learns that
    its run was cancelled.
    """
    if run.status != "running":
        raise Conflict(
            f"run {run.id} is {run.status}; progress is recorded only while it is running",
            run_status=run.status,
        )
    if replayed < 0:
        raise Invalid(f"events replayed must be >= 0, got {replayed}")
    run.events_replayed = replayed
    run.heartbeat_at = datetime.now(UTC)
    return run


def _text_safe(value: str) -> str:
    """`value` without NUL characters, which Postgres text and JSONB refuse."""
    return value.replace("\x00", "")


def _json_safe(value: Any) -> Any:
    """`value` with NaN/infinite floats as None: JSONB refuses them (e.g. an undefined AUC)."""
    if isinstance(value, float):
        return value if isfinite(value) else None
    if isinstance(value, str):
        return _text_safe(value)
    if isinstance(value, dict):
        return {_text_safe(str(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def mark_succeeded(
    session: Session,
    run: TrainingRun,
    metrics: dict[str, Any],
    mlflow_run_id: str | None,
    mlflow_url: str | None,
    model_version_id: int | None,
) -> TrainingRun:
    """Worker: the model was trained, evaluated and registered."""
    if mlflow_run_id is not None and len(mlflow_run_id) > 64:
        raise Invalid(f"an MLflow run id has at most 64 characters, got {len(mlflow_run_id)}")
    if mlflow_url is not None and len(mlflow_url) > 500:
        raise Invalid(f"the MLflow URL has at most 500 characters, got {len(mlflow_url)}")
    _transition(session, WORKER, run, "succeeded")
    now = datetime.now(UTC)
    run.finished_at = now
    run.heartbeat_at = now
    run.metrics = _json_safe(metrics)
    run.mlflow_run_id = mlflow_run_id
    run.mlflow_url = mlflow_url
    run.model_version_id = model_version_id
    return run


def requeue_lost_run(session: Session, run: TrainingRun, reason: str) -> TrainingRun:
    """Control plane: the run's worker stopped sending heartbeats; queue the run again.

    A new task id per attempt, so the broker never deduplicates the retry against the lost one.
    """
    _transition(session, WORKER, run, "queued")
    run.error = _text_safe(reason)[:MAX_ERROR_CHARS]
    run.worker = None
    enqueue_task(
        session,
        TRAIN_TASK,
        {"run_id": run.id},
        task_id=f"{task_id_for(run.id)}-attempt-{run.attempts + 1}",
    )
    return run


def mark_failed(session: Session, run: TrainingRun, error: str) -> TrainingRun:
    """Worker: the run failed; `error` says why (shown to users and printed by the CLI)."""
    _transition(session, WORKER, run, "failed")
    now = datetime.now(UTC)
    run.finished_at = now
    run.heartbeat_at = now
    run.error = _text_safe(error)[:MAX_ERROR_CHARS]
    return run
