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
import time
from typing import Any

import structlog
from celery.signals import worker_process_init

from carrara.db import engine_for
from carrara.settings import get_settings
from carrara.training import service
from carrara.training.lease import (
    Heartbeat,
    RunStopped,
    claim_run,
    fail_run,
    finish_run,
    sessions_for,
)
from carrara.training.pipeline import execute
from carrara.training.worker import app

log = structlog.get_logger(__name__)


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked pool process must not share the parent's database connections."""
    engine_for.cache_clear()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@app.task(name=service.TRAIN_TASK, bind=True)
def train_run(self: Any, run_id: int) -> dict[str, Any]:
    """Train run `run_id` (see the module docstring for the safety rules)."""
    settings = get_settings()
    worker = f"{self.request.hostname or socket.gethostname()}:{self.request.id}"[:200]
    sessions = sessions_for(settings)
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
