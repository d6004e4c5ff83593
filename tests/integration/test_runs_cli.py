"""`carrara runs ...` against the API in its own process, as a CI pipeline runs it.

Every run the live API creates is relayed to the real Redis broker; each test takes its runs'
messages off the queue afterwards so no worker ever tries to train them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from carrara.models import OutboxMessage, TrainingRun
from carrara.settings import Settings
from carrara.training import service
from tests.integration.conftest import ROOT, LiveApi, run_cli
from tests.integration.test_runs_api import make_dataset, take_task_message


@pytest.fixture
def taken_runs(stack_settings: Settings) -> Iterator[list[int]]:
    """Run ids whose Celery messages are removed from Redis after the test."""
    run_ids: list[int] = []
    yield run_ids
    client = redis.Redis.from_url(stack_settings.redis_url)
    try:
        for run_id in run_ids:
            take_task_message(client, f"run-{run_id}")
    finally:
        client.close()


@pytest.fixture
def dataset_name(engine: Engine) -> str:
    """A committed dataset (the live API has its own connections) with v1 of 1000 events."""
    with Session(engine) as session, session.begin():
        return make_dataset(session).name


def start_args(dataset: str, *extra: str) -> list[str]:
    return [
        "runs",
        "start",
        "--dataset",
        dataset,
        "--version",
        "1",
        "--algorithm",
        "logistic_regression",
        "--model",
        "cli-model",
        *extra,
    ]


def cli_json(live_api: LiveApi, *args: str) -> dict:
    result = run_cli(live_api, *args)
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


def test_start_show_list_and_cancel(
    live_api: LiveApi, dataset_name: str, taken_runs: list[int]
) -> None:
    run = cli_json(live_api, *start_args(dataset_name, "--json"))
    taken_runs.append(run["id"])
    assert (run["status"], run["dataset"], run["events_total"]) == ("queued", dataset_name, 1000)
    assert cli_json(live_api, "runs", "show", str(run["id"]), "--json")["id"] == run["id"]
    listed = orjson.loads(
        run_cli(live_api, "runs", "list", "--dataset", dataset_name, "--json").stdout
    )
    assert [r["id"] for r in listed] == [run["id"]]
    table = run_cli(live_api, "runs", "list", "--dataset", dataset_name)
    assert table.returncode == 0
    assert f"{dataset_name} v1" in table.stdout
    assert "queued" in table.stdout
    shown = run_cli(live_api, "runs", "show", str(run["id"]))
    assert "logistic_regression" in shown.stdout
    assert "cli-model" in shown.stdout

    cancelled = run_cli(live_api, "runs", "cancel", str(run["id"]))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"run {run['id']} cancelled" in cancelled.stdout
    again = run_cli(live_api, "runs", "cancel", str(run["id"]))
    assert again.returncode == 2
    assert f"409 run {run['id']} is already cancelled" in again.stderr
    assert run_cli(live_api, "runs", "show", "999999").returncode == 2
    plain = run_cli(live_api, *start_args(dataset_name))
    assert plain.returncode == 0, plain.stderr
    taken_runs.append(int(plain.stdout.split()[1]))
    assert plain.stdout.strip().endswith("queued")


def test_params_are_yaml_values_and_override_the_params_file(
    live_api: LiveApi, dataset_name: str, taken_runs: list[int], tmp_path: Path
) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text("C: 2\nmax_iter: 300\nseed: 7\n")
    run = cli_json(
        live_api,
        *start_args(
            dataset_name,
            "--params-file",
            str(params_file),
            "--param",
            "C=0.5",
            "-p",
            "class_weight=balanced",
            "--holdout-fraction",
            "0.3",
            "--json",
        ),
    )
    taken_runs.append(run["id"])
    assert run["params"]["C"] == 0.5
    assert run["params"]["max_iter"] == 300
    assert run["params"]["seed"] == 7
    assert run["params"]["class_weight"] == "balanced"
    assert run["holdout"] == {"method": "hash", "fraction": 0.3, "seed": 0}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--param", "gamma=2"), "params.gamma: unknown parameter for logistic_regression"),
        (("--param", "max_iter=lots"), "params.max_iter: Input should be a valid integer"),
        (("--param", "noequals"), "--param 'noequals' must look like name=value"),
        (("--algorithm", "linear_regression"), "cannot train on a binary dataset"),
    ],
)
def test_bad_params_exit_2_with_the_api_message(
    live_api: LiveApi, dataset_name: str, extra: tuple[str, ...], message: str
) -> None:
    result = run_cli(live_api, *start_args(dataset_name, *extra))
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())


def test_a_retried_start_with_the_same_key_gets_the_same_run(
    live_api: LiveApi, engine: Engine, dataset_name: str, taken_runs: list[int]
) -> None:
    key = f"ci-build-{uuid.uuid4()}"
    first = cli_json(live_api, *start_args(dataset_name, "--idempotency-key", key, "--json"))
    taken_runs.append(first["id"])
    retry = cli_json(live_api, *start_args(dataset_name, "--idempotency-key", key, "--json"))
    assert retry["id"] == first["id"]
    with Session(engine) as session:
        pending_or_sent = session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.key == f"run-{first['id']}")
        )
    assert pending_or_sent == 1
    clash = run_cli(
        live_api, *start_args(dataset_name, "--idempotency-key", key, "-p", "C=9", "--json")
    )
    assert clash.returncode == 2
    assert "409" in clash.stderr
    assert "with a different request (different params)" in " ".join(clash.stderr.split())


def _popen_wait(live_api: LiveApi, dataset: str, key: str, *extra: str) -> subprocess.Popen[str]:
    args = start_args(
        dataset, "--idempotency-key", key, "--wait", "--poll-interval", "0.2", "--json", *extra
    )
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "carrara"), *args],
        cwd=ROOT,
        env={**os.environ, **live_api.env, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_with_key(engine: Engine, key: str, proc: subprocess.Popen[str]) -> int:
    """The id of the run the waiting CLI created (found by its idempotency key)."""
    deadline = time.monotonic() + 60
    while True:
        with Session(engine) as session:
            run_id = session.scalar(
                select(TrainingRun.id).where(TrainingRun.idempotency_key == key)
            )
        if run_id is not None:
            return run_id
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"the CLI created no run (exit {proc.returncode}): {out}\n{err}")
        time.sleep(0.1)


def _polls(live_api: LiveApi, run_id: int) -> int:
    """How many times the run was fetched, from the API's access log: the waiting CLI's progress."""
    return live_api.log.read_text(errors="replace").count(f'"GET /api/v1/runs/{run_id} HTTP')


def _wait_for_polls(live_api: LiveApi, run_id: int, proc: subprocess.Popen[str]) -> None:
    """Wait until the CLI has checked the run twice more, so it has seen the run's current state
    (and did not stop on it)."""
    target = _polls(live_api, run_id) + 2
    deadline = time.monotonic() + 30
    while _polls(live_api, run_id) < target:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the CLI stopped polling run {run_id} (exit {proc.returncode}): {err}")
        time.sleep(0.05)


def _as_worker(engine: Engine, run_id: int, step: Callable[[Session, TrainingRun], object]) -> None:
    """Apply a worker transition to the run and commit it, as the training worker will."""
    with Session(engine) as session, session.begin():
        step(session, service.get_run(session, run_id, for_update=True))


def test_wait_exits_0_when_the_run_succeeds(
    live_api: LiveApi, engine: Engine, dataset_name: str, taken_runs: list[int]
) -> None:
    key = f"wait-ok-{uuid.uuid4()}"
    proc = _popen_wait(live_api, dataset_name, key, "--timeout", "120")
    run_id = _run_with_key(engine, key, proc)
    taken_runs.append(run_id)
    _wait_for_polls(live_api, run_id, proc)
    assert proc.poll() is None  # it saw the queued run, and still waits
    _as_worker(engine, run_id, service.mark_running)
    _as_worker(engine, run_id, lambda s, r: service.record_progress(s, r, 600))
    _wait_for_polls(live_api, run_id, proc)
    assert proc.poll() is None  # it saw the run at 600/1000, and still waits
    _as_worker(engine, run_id, lambda s, r: service.record_progress(s, r, 1000))
    _as_worker(
        engine,
        run_id,
        lambda s, r: service.mark_succeeded(s, r, {"auc": 0.93}, "mlf-1", "http://mlflow/r", None),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    final = orjson.loads(out)
    assert (final["id"], final["status"], final["metrics"]) == (run_id, "succeeded", {"auc": 0.93})
    assert "1000/1000" in err  # the progress bar, on stderr


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_wait_exits_1_with_the_error_when_the_run_fails_or_is_cancelled(
    live_api: LiveApi, engine: Engine, dataset_name: str, taken_runs: list[int], outcome: str
) -> None:
    key = f"wait-{outcome}-{uuid.uuid4()}"
    proc = _popen_wait(live_api, dataset_name, key, "--timeout", "120")
    run_id = _run_with_key(engine, key, proc)
    taken_runs.append(run_id)
    _as_worker(engine, run_id, service.mark_running)
    if outcome == "failed":
        _as_worker(
            engine, run_id, lambda s, r: service.mark_failed(s, r, "label column 'label' is empty")
        )
    else:
        assert run_cli(live_api, "runs", "cancel", str(run_id)).returncode == 0
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert orjson.loads(out)["status"] == outcome
    expected = f"run {run_id} {outcome}"
    if outcome == "failed":
        expected += ": label column 'label' is empty"
    assert expected in " ".join(err.split())


def test_wait_exits_4_on_timeout(
    live_api: LiveApi, dataset_name: str, taken_runs: list[int]
) -> None:
    started = time.monotonic()
    result = run_cli(
        live_api, *start_args(dataset_name, "--wait", "--timeout", "1", "--poll-interval", "0.2")
    )
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 30
    message = " ".join(result.stderr.split())
    assert "is still queued after 1s" in message
    taken_runs.append(int(message.split("error: run ")[1].split()[0]))
