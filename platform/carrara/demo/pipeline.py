"""The calls a CI pipeline makes, shared by both scenarios: runs, model versions, deployments."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from carrara.demo.api import ApiError
from carrara.demo.context import DemoContext

RUN_TIMEOUT_S = 300
ROLLOUT_TIMEOUT_S = 120
FINISHED = {"succeeded", "failed", "cancelled"}


def start_run(
    ctx: DemoContext,
    dataset: str,
    version: int,
    algorithm: str,
    params: dict[str, Any],
    model: str,
    key: str = "",
) -> int:
    """POST /runs; the run's id (the idempotency key makes a retried call start it only once;
    `key` tells apart runs of one algorithm on one snapshot, e.g. with and without features)."""
    run = ctx.api.post(
        "/runs",
        json={
            "dataset": dataset,
            "dataset_version": version,
            "algorithm": algorithm,
            "params": params,
            "registered_model_name": model,
        },
        headers={"Idempotency-Key": f"{dataset}-{version}-{algorithm}{key}"},
    )
    return int(run["id"])


def _run_state(run: dict[str, Any]) -> str:
    status = run["status"]
    if status == "running":
        if run["progress"] < 1:
            return f"replaying the snapshot ({run['progress']:.0%})"
        return "training and logging to MLflow"
    if status == "succeeded":
        auc = (run.get("metrics") or {}).get("auc")
        return "succeeded" + (f", holdout AUC {auc:.3f}" if isinstance(auc, float) else "")
    return status


def wait_runs(ctx: DemoContext, runs: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Follow runs (label -> id) with a progress bar each until all finish; their last state."""
    finished: dict[str, dict[str, Any]] = {}
    try:
        return _follow_runs(ctx, runs, finished)
    except BaseException:
        # Interrupted or timed out: a run left queued would hold the next demo's worker up.
        for label, run_id in runs.items():
            if label not in finished:
                with contextlib.suppress(ApiError):
                    ctx.api.post(f"/runs/{run_id}/cancel")
        raise


def _follow_runs(
    ctx: DemoContext, runs: dict[str, int], finished: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with ctx.progress() as progress:
        tasks = {label: progress.add_task(f"{label}: queued", total=100) for label in runs}
        while len(finished) < len(runs):
            for label, run_id in runs.items():
                if label in finished:
                    continue
                run = ctx.api.get(f"/runs/{run_id}")
                done = run["status"] in FINISHED
                completed = 100 if done else (95 * run["progress"] if run["progress"] else 0)
                progress.update(
                    tasks[label], completed=completed, description=f"{label}: {_run_state(run)}"
                )
                if done:
                    finished[label] = run
            if time.monotonic() > deadline:
                late = ", ".join(sorted(set(runs) - set(finished)))
                raise TimeoutError(f"runs not finished after {RUN_TIMEOUT_S} s: {late}")
            if len(finished) < len(runs):
                time.sleep(1.0)
    return finished


def check_run(step: Any, label: str, run: dict[str, Any], metric: str, margin: float) -> None:
    """The run succeeded and its holdout `metric` beats the baseline's by at least `margin`."""
    if not step.check(
        run["status"] == "succeeded", f"{label} run {run['id']} {run['status']}: {run['error']}"
    ):
        return
    metrics = run.get("metrics") or {}
    value, baseline = metrics.get(metric), metrics.get(f"baseline_{metric}")
    step.check(
        isinstance(value, float) and isinstance(baseline, float) and value >= baseline + margin,
        f"{label}: holdout {metric} {value} does not beat the baseline's {baseline} by {margin}",
    )


def versions_by_run(ctx: DemoContext, model: str) -> dict[int, int]:
    """Registered model `model`'s versions by the id of the run that trained them."""
    found = ctx.api.get(f"/models/{model}")
    return {v["run"]["id"]: v["version"] for v in found["versions"] if v.get("run")}


def wait_rollout(ctx: DemoContext, name: str) -> dict[str, Any]:
    """Wait until every scorer of the pool serves the deployment's current revision."""
    with ctx.progress(bar=False) as progress:
        task = progress.add_task("waiting for the scorers to load the models", total=None)

        def show(deployment: dict[str, Any]) -> None:
            progress.update(task, description=f"rollout: {deployment['rollout']['summary']}")

        deployment = ctx.api.poll(
            f"/deployments/{name}",
            lambda d: (
                d["rollout"]["up_to_date"] >= ctx.scorers
                and d["rollout"]["up_to_date"] == d["rollout"]["total"]
            ),
            timeout=ROLLOUT_TIMEOUT_S,
            on_update=show,
        )
    rollout = deployment["rollout"]
    if rollout["up_to_date"] < ctx.scorers:
        failing = [
            f"{s['instance_id']}: {s['state']} {s['last_error'] or ''}".strip()
            for s in rollout["scorers"]
            if s["served_revision"] != rollout["desired_revision"]
        ]
        raise TimeoutError(
            f"after {ROLLOUT_TIMEOUT_S} s: {rollout['summary']} (expected {ctx.scorers})"
            + (f"; {'; '.join(failing)}" if failing else "")
        )
    return deployment


def stop_deployment(ctx: DemoContext, name: str) -> bool:
    """Stop a demo deployment so scorers do not keep its models loaded; False if that failed."""
    try:
        ctx.api.delete(f"/deployments/{name}", params={"reason": "carrara demo finished"})
    except ApiError:
        return False
    return True
