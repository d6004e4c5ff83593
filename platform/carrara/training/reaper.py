"""The control plane's reaper: runs whose worker stopped sending heartbeats are never left running.

A run in `running` whose `heartbeat_at` is older than `run_heartbeat_timeout_s` lost its worker
(killed with SIGKILL, out of memory, machine gone). It is re-queued with a new task, or failed
with the reason once it has been started `training_max_attempts` times.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import TrainingRun
from carrara.settings import Settings
from carrara.training import service

log = structlog.get_logger(__name__)


def reap_lost_runs(session: Session, settings: Settings, limit: int = 100) -> int:
    """Re-queue or fail running runs without a recent heartbeat; returns how many were handled."""
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.run_heartbeat_timeout_s)
    lost = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == "running", TrainingRun.heartbeat_at < cutoff)
        .order_by(TrainingRun.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for run in lost:
        silent = (datetime.now(UTC) - run.heartbeat_at).total_seconds() if run.heartbeat_at else 0
        reason = (
            f"worker {run.worker or '?'} stopped sending heartbeats ({silent:.0f} s silent) "
            f"during attempt {run.attempts}"
        )
        if run.attempts >= settings.training_max_attempts:
            service.mark_failed(session, run, f"{reason}; gave up after {run.attempts} attempts")
            log.warning("lost run failed", run_id=run.id, attempts=run.attempts)
        else:
            service.requeue_lost_run(session, run, f"{reason}; re-queued")
            log.warning("lost run re-queued", run_id=run.id, attempts=run.attempts)
    return len(lost)
