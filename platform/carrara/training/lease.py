"""The worker's hold on a run: claim it under a row lock, beat while training, record the end.

See `carrara.training.tasks` for the safety rules these implement.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from carrara.db import engine_for
from carrara.errors import NotFound
from carrara.models import TrainingRun
from carrara.models.training import FINISHED_STATES
from carrara.settings import Settings
from carrara.training import service
from carrara.training.pipeline import Job, Outcome

log = structlog.get_logger(__name__)


class RunStopped(Exception):
    """The run left `running` on this worker (cancelled or re-queued) while we worked."""


def sessions_for(settings: Settings) -> sessionmaker[Session]:
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
                "format": dataset.format,
                "subject": dataset.subject,
            },
            feature_set=_feature_set(run),
        )


def _feature_set(run: TrainingRun) -> dict[str, Any] | None:
    """The run's pinned feature-set revision, copied out of the ORM (None: raw fields only)."""
    revision = run.feature_set_revision
    if revision is None:
        return None
    return {
        "number": revision.number,
        "sql": revision.sql,
        "late_policy": revision.late_policy,
        "allowed_lateness_ms": revision.allowed_lateness_ms,
        "digest": revision.digest,
    }


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
            artifact_digests=outcome.artifact_digests,
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
