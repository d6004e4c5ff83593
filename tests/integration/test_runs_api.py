"""Training runs through the API on the real Postgres: states, cancel, idempotency, the outbox,
and the Celery task reaching the real Redis broker only once the run is committed."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from carrara.auth.roles import Role
from carrara.auth.service import Principal
from carrara.errors import Conflict, Invalid
from carrara.models import (
    AuditEvent,
    Dataset,
    DatasetVersion,
    ModelVersion,
    OutboxMessage,
    RegisteredModel,
    TrainingRun,
)
from carrara.outbox.relay import OutboxRelay, celery_sender_for
from carrara.settings import Settings
from carrara.training import service
from carrara.training.algorithms import validate_params
from carrara.training.schemas import Holdout
from tests.integration.conftest import LiveApi

CELERY_QUEUE = "carrara"  # the default queue of carrara.training.worker; no test worker eats it


def make_dataset(
    session: Session,
    *,
    task: str = "binary",
    event_time_field: str | None = "ts",
    versions: tuple[int, ...] = (1000,),
) -> Dataset:
    """A dataset row with one version per event count in `versions` (v1, v2, ...)."""
    name = f"ds-{uuid.uuid4().hex[:12]}"
    dataset = Dataset(
        name=name,
        topic=f"topic-{name}",
        key_field="user_id",
        event_time_field=event_time_field,
        label_field=None if task == "anomaly" else "label",
        task=task,
        features=[{"name": "amount", "type": "float"}],
        description="",
        owner="tests",
        created_by="tests",
    )
    session.add(dataset)
    session.flush()
    for number, count in enumerate(versions, start=1):
        session.add(
            DatasetVersion(
                dataset_id=dataset.id,
                number=number,
                offsets=[{"partition": 0, "start": 0, "end": count}],
                event_count=count,
                mode="latest",
                selector={},
                created_by="tests",
                description="",
            )
        )
    session.flush()
    return dataset


def run_body(dataset_name: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "dataset": dataset_name,
        "dataset_version": 1,
        "algorithm": "logistic_regression",
        "params": {"C": 0.5},
        "holdout": {"method": "hash", "fraction": 0.25, "seed": 3},
        "registered_model_name": "fraud-detector",
    }
    body.update(overrides)
    return body


def outbox_rows(session: Session, run_id: int) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.key == f"run-{run_id}")))


def take_task_message(client: redis.Redis, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait for the Celery message of `task_id` in the default queue, remove it and return it."""
    deadline = time.monotonic() + timeout
    while True:
        for raw in client.lrange(CELERY_QUEUE, 0, -1):
            message = orjson.loads(raw)
            if message.get("headers", {}).get("id") == task_id:
                # Remove exactly this message, so no worker ever tries to train a test run.
                client.lrem(CELERY_QUEUE, 1, raw)
                return message
        if time.monotonic() > deadline:
            pytest.fail(f"no Celery message for task {task_id} in Redis list {CELERY_QUEUE!r}")
        time.sleep(0.2)


@pytest.fixture
def broker(stack_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack_settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def dataset(db_session: Session) -> Dataset:
    return make_dataset(db_session, versions=(1000, 2500))


# --- the catalogue ---------------------------------------------------------------------------


def test_algorithms_are_listed_with_their_tasks_and_params_schemas(
    client: TestClient, viewer_headers: dict[str, str]
) -> None:
    response = client.get("/api/v1/runs/algorithms", headers=viewer_headers)
    assert response.status_code == 200
    by_name = {a["name"]: a for a in response.json()}
    assert set(by_name) == {
        "logistic_regression",
        "linear_regression",
        "random_forest",
        "hist_gradient_boosting",
        "lightgbm",
        "xgboost",
        "autoencoder",
        "auto",
    }
    assert by_name["linear_regression"]["tasks"] == ["regression"]
    assert by_name["autoencoder"]["tasks"] == ["anomaly", "binary"]
    leaves = by_name["lightgbm"]["params_schema"]["properties"]["num_leaves"]
    assert (leaves["minimum"], leaves["maximum"]) == (2, 131_072)


# --- create ----------------------------------------------------------------------------------


def test_starting_a_run_queues_it_and_enqueues_exactly_one_task_in_the_outbox(
    client: TestClient, db_session: Session, editor_headers: dict[str, str], dataset: Dataset
) -> None:
    response = client.post(
        "/api/v1/runs", json=run_body(dataset.name, dataset_version=2), headers=editor_headers
    )
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["status"] == "queued"
    assert (run["dataset"], run["dataset_version"]) == (dataset.name, 2)
    assert run["events_total"] == 2500
    assert (run["events_replayed"], run["progress"]) == (0, 0.0)
    assert run["created_by"] == "test-editor"
    assert run["params"]["C"] == 0.5
    assert run["params"]["max_iter"] == 1000  # defaults are stored with the run
    assert run["holdout"] == {"method": "hash", "fraction": 0.25, "seed": 3}
    assert run["idempotency_key"] is None
    assert run["started_at"] is None
    rows = outbox_rows(db_session, run["id"])
    assert len(rows) == 1
    (row,) = rows
    assert (row.kind, row.destination) == ("celery", "carrara.training.train_run")
    assert row.payload == {"run_id": run["id"]}
    assert row.published_at is None
    audit = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.resource_type == "run", AuditEvent.resource_id == str(run["id"])
        )
    ).all()
    assert [(a.action, a.actor) for a in audit] == [("run.create", "test-editor")]
    assert audit[0].after["algorithm"] == "logistic_regression"


def test_a_run_is_shown_with_its_dataset_and_version(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    dataset: Dataset,
) -> None:
    created = client.post("/api/v1/runs", json=run_body(dataset.name), headers=editor_headers)
    shown = client.get(f"/api/v1/runs/{created.json()['id']}", headers=viewer_headers)
    assert shown.status_code == 200
    assert shown.json() == created.json()
    for key in ("metrics", "error", "mlflow_run_id", "mlflow_url", "model_version_id"):
        assert key in shown.json()


def test_holdout_defaults_apply(
    client: TestClient, editor_headers: dict[str, str], dataset: Dataset
) -> None:
    body = run_body(dataset.name)
    del body["holdout"]
    response = client.post("/api/v1/runs", json=body, headers=editor_headers)
    assert response.status_code == 201
    assert response.json()["holdout"] == {"method": "hash", "fraction": 0.2, "seed": 0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": "no-such-dataset"}, "dataset 'no-such-dataset' does not exist"),
        ({"dataset_version": 3}, "has no version 3; its latest version is v2"),
    ],
)
def test_unknown_dataset_or_version_is_404(
    client: TestClient,
    editor_headers: dict[str, str],
    dataset: Dataset,
    change: dict[str, Any],
    message: str,
) -> None:
    response = client.post(
        "/api/v1/runs", json=run_body(dataset.name, **change), headers=editor_headers
    )
    assert response.status_code == 404
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"params": {"C": 1, "gamma": 2}},
            "params.gamma: unknown parameter for logistic_regression",
        ),
        ({"params": {"C": -1}}, "params.C: Input should be greater than 0"),
        ({"params": {"max_iter": 10**12}}, "params.max_iter: Input should be less than or equal"),
        ({"params": {"max_iter": "many"}}, "params.max_iter: Input should be a valid integer"),
        ({"algorithm": "linear_regression", "params": {}}, "cannot train on a binary dataset"),
        ({"algorithm": "sorcery", "params": {}}, "unknown algorithm 'sorcery'; known algorithms:"),
        ({"registered_model_name": "team/model"}, "registered_model_name: String should match"),
        ({"registered_model_name": "m" * 201}, "registered_model_name: String should match"),
        ({"holdout": {"method": "hash", "fraction": 1}}, "holdout.fraction: Input should be less"),
        ({"holdout": {"method": "random"}}, "holdout.method: Input should be 'hash' or 'time'"),
        ({"holdout": {"method": "hash", "folds": 3}}, "holdout.folds: Extra inputs"),
        ({"dataset_version": 2**31}, "dataset_version: Input should be less than or equal"),
        ({"priority": 1}, "priority: Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_422_with_a_precise_message_and_starts_nothing(
    client: TestClient,
    db_session: Session,
    editor_headers: dict[str, str],
    dataset: Dataset,
    change: dict[str, Any],
    message: str,
) -> None:
    response = client.post(
        "/api/v1/runs", json=run_body(dataset.name, **change), headers=editor_headers
    )
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    runs = db_session.scalar(
        select(func.count())
        .select_from(TrainingRun)
        .join(DatasetVersion)
        .where(DatasetVersion.dataset_id == dataset.id)
    )
    assert runs == 0


def test_a_time_holdout_needs_an_event_time_field(
    client: TestClient, db_session: Session, editor_headers: dict[str, str]
) -> None:
    untimed = make_dataset(db_session, event_time_field=None)
    body = run_body(untimed.name, holdout={"method": "time"})
    response = client.post("/api/v1/runs", json=body, headers=editor_headers)
    assert response.status_code == 422
    assert "holdout method 'time' needs an event-time field" in response.json()["detail"]
    timed = make_dataset(db_session)
    response = client.post(
        "/api/v1/runs",
        json=run_body(timed.name, holdout={"method": "time"}),
        headers=editor_headers,
    )
    assert response.status_code == 201


def test_an_anomaly_dataset_takes_the_autoencoder(
    client: TestClient, db_session: Session, editor_headers: dict[str, str]
) -> None:
    anomaly = make_dataset(db_session, task="anomaly")
    body = run_body(anomaly.name, algorithm="autoencoder", params={"hidden_layers": [16, 4, 16]})
    response = client.post("/api/v1/runs", json=body, headers=editor_headers)
    assert response.status_code == 201, response.text
    assert response.json()["params"]["target_alert_rate"] == 0.01
    refused = client.post("/api/v1/runs", json=run_body(anomaly.name), headers=editor_headers)
    assert refused.status_code == 422
    assert "algorithms for anomaly: autoencoder" in refused.json()["detail"]


# --- auth ------------------------------------------------------------------------------------


def test_roles(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    dataset: Dataset,
) -> None:
    body = run_body(dataset.name)
    assert client.post("/api/v1/runs", json=body).status_code == 401
    assert client.get("/api/v1/runs").status_code == 401
    assert client.get("/api/v1/runs/algorithms").status_code == 401
    refused = client.post("/api/v1/runs", json=body, headers=viewer_headers)
    assert refused.status_code == 403
    assert "needs the editor role" in refused.json()["detail"]
    run_id = client.post("/api/v1/runs", json=body, headers=editor_headers).json()["id"]
    assert client.get(f"/api/v1/runs/{run_id}", headers=viewer_headers).status_code == 200
    assert client.get("/api/v1/runs", headers=viewer_headers).status_code == 200
    assert client.post(f"/api/v1/runs/{run_id}/cancel", headers=viewer_headers).status_code == 403
    assert client.post(f"/api/v1/runs/{run_id}/cancel").status_code == 401


# --- idempotency -----------------------------------------------------------------------------


def test_the_same_idempotency_key_returns_the_same_run_and_enqueues_nothing_more(
    client: TestClient, db_session: Session, editor_headers: dict[str, str], dataset: Dataset
) -> None:
    headers = {**editor_headers, "Idempotency-Key": f"ci-{uuid.uuid4()}"}
    first = client.post("/api/v1/runs", json=run_body(dataset.name), headers=headers)
    assert first.status_code == 201
    again = client.post("/api/v1/runs", json=run_body(dataset.name), headers=headers)
    assert again.status_code == 200
    assert again.json() == first.json()
    # Params equal once defaults are filled in are the same request.
    explicit = run_body(dataset.name, params={"C": 0.5, "max_iter": 1000, "seed": 42})
    assert client.post("/api/v1/runs", json=explicit, headers=headers).status_code == 200
    assert len(outbox_rows(db_session, first.json()["id"])) == 1
    created = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "run.create", AuditEvent.resource_id == str(first.json()["id"])
        )
    ).all()
    assert len(created) == 1
    runs = db_session.scalar(
        select(func.count())
        .select_from(TrainingRun)
        .where(TrainingRun.idempotency_key == headers["Idempotency-Key"])
    )
    assert runs == 1


def test_the_same_idempotency_key_with_another_body_is_409(
    client: TestClient, db_session: Session, editor_headers: dict[str, str], dataset: Dataset
) -> None:
    headers = {**editor_headers, "Idempotency-Key": f"ci-{uuid.uuid4()}"}
    first = client.post("/api/v1/runs", json=run_body(dataset.name), headers=headers)
    other = run_body(dataset.name, algorithm="xgboost", params={"max_depth": 4})
    response = client.post("/api/v1/runs", json=other, headers=headers)
    assert response.status_code == 409
    problem = response.json()
    assert problem["detail"] == (
        f"Idempotency-Key {headers['Idempotency-Key']!r} was already used for run "
        f"{first.json()['id']} with a different request (different algorithm, params); "
        "use a new key for a new run"
    )
    assert problem["differing_fields"] == ["algorithm", "params"]
    other_version = run_body(dataset.name, dataset_version=2)
    assert client.post("/api/v1/runs", json=other_version, headers=headers).status_code == 409
    assert len(outbox_rows(db_session, first.json()["id"])) == 1


@pytest.mark.parametrize("key", [b"", b"k" * 201, "caf\u00e9".encode("latin-1")])
def test_an_idempotency_key_must_be_1_to_200_printable_ascii_characters(
    client: TestClient, editor_headers: dict[str, str], dataset: Dataset, key: bytes
) -> None:
    headers: dict[str, str | bytes] = {**editor_headers, "Idempotency-Key": key}
    response = client.post("/api/v1/runs", json=run_body(dataset.name), headers=headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "header.Idempotency-Key"


@pytest.mark.parametrize("same_body", [True, False])
def test_two_requests_racing_with_one_key_never_start_two_runs(
    engine: Engine, same_body: bool
) -> None:
    """The loser collides on the unique key, re-reads in a savepoint and answers as a replay."""
    with Session(engine) as setup, setup.begin():
        name = make_dataset(setup).name
    key = f"race-{uuid.uuid4()}"
    holdout = Holdout().model_dump(mode="json")
    winner = Session(engine)
    version = service.resolve_dataset_version(winner, name, 1)
    won = TrainingRun(
        dataset_version_id=version.id,
        algorithm="logistic_regression",
        params=validate_params("logistic_regression", "binary", {}),
        holdout=holdout,
        registered_model_name="race-model",
        events_total=version.event_count,
        idempotency_key=key,
        created_by="winner",
    )
    winner.add(won)
    winner.flush()  # the unique key is now held by this uncommitted transaction
    outcome: dict[str, Any] = {}

    def loser() -> None:
        with Session(engine) as session:
            try:
                run, created = service.create_run(
                    session,
                    Principal(token_id=None, name="loser", role=Role.editor),
                    dataset=name,
                    dataset_version=1,
                    algorithm="logistic_regression",
                    params={} if same_body else {"C": 3},
                    holdout=holdout,
                    registered_model_name="race-model",
                    idempotency_key=key,
                )
                outcome.update(run_id=run.id, created=created)
                outcome["outbox"] = session.scalar(
                    select(func.count())
                    .select_from(OutboxMessage)
                    .where(OutboxMessage.key == f"run-{run.id}")
                )
            except Exception as exc:
                outcome["error"] = exc
            finally:
                session.rollback()

    thread = threading.Thread(target=loser)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        with engine.connect() as probe:
            # Wait until the loser's INSERT is blocked on the winner's key.
            while not probe.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO training_runs%'"
                )
            ):
                assert time.monotonic() < deadline, "the loser never blocked on the key"
                probe.rollback()  # statistics views are snapshotted once per transaction
                time.sleep(0.05)
        winner.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
        if same_body:
            assert outcome == {"run_id": won.id, "created": False, "outbox": 0}
        else:
            assert isinstance(outcome["error"], Conflict)
            assert f"already used for run {won.id}" in outcome["error"].detail
    finally:
        winner.close()
        with Session(engine) as cleanup, cleanup.begin():
            cleanup.execute(
                text("DELETE FROM training_runs WHERE idempotency_key = :k"), {"k": key}
            )
            cleanup.execute(text("DELETE FROM datasets WHERE name = :n"), {"n": name})


# --- list ------------------------------------------------------------------------------------


def test_runs_are_listed_newest_first_page_by_page_and_filtered(
    client: TestClient,
    db_session: Session,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    dataset: Dataset,
) -> None:
    other = make_dataset(db_session)
    ids = [
        client.post("/api/v1/runs", json=body, headers=editor_headers).json()["id"]
        for body in (
            run_body(dataset.name),
            run_body(dataset.name, algorithm="random_forest", params={}),
            run_body(dataset.name, registered_model_name="churn"),
            run_body(other.name),
        )
    ]
    client.post(f"/api/v1/runs/{ids[0]}/cancel", headers=editor_headers)

    def listed(**query: Any) -> dict[str, Any]:
        response = client.get("/api/v1/runs", params=query, headers=viewer_headers)
        assert response.status_code == 200, response.text
        return response.json()

    first = listed(dataset=dataset.name, limit=2)
    assert [r["id"] for r in first["items"]] == [ids[2], ids[1]]
    second = listed(dataset=dataset.name, limit=2, cursor=first["next_cursor"])
    assert [r["id"] for r in second["items"]] == [ids[0]]
    assert second["next_cursor"] is None
    assert [r["id"] for r in listed(dataset=other.name)["items"]] == [ids[3]]
    only_rf = listed(dataset=dataset.name, algorithm="random_forest")["items"]
    assert [r["id"] for r in only_rf] == [ids[1]]
    churn = listed(dataset=dataset.name, registered_model_name="churn")["items"]
    assert [r["id"] for r in churn] == [ids[2]]
    cancelled = listed(dataset=dataset.name, status="cancelled")["items"]
    assert [(r["id"], r["status"]) for r in cancelled] == [(ids[0], "cancelled")]
    queued = listed(dataset=dataset.name, status="queued")["items"]
    assert [r["id"] for r in queued] == [ids[2], ids[1]]
    assert listed(dataset="no-such-dataset")["items"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "paused"}, "status"),
        ({"dataset": "Not A Slug"}, "dataset"),
        ({"algorithm": "lightgbm\x00"}, "algorithm"),
        ({"limit": 0}, "limit"),
        ({"cursor": "garbage!"}, None),
    ],
)
def test_bad_list_queries_are_422(
    client: TestClient, viewer_headers: dict[str, str], query: dict[str, Any], field: str | None
) -> None:
    response = client.get("/api/v1/runs", params=query, headers=viewer_headers)
    assert response.status_code == 422
    if field:
        assert response.json()["errors"][0]["field"] == f"query.{field}"


@pytest.mark.parametrize("run_id", ["999999", "0", str(2**31), "abc"])
def test_unknown_or_malformed_run_ids(
    client: TestClient, viewer_headers: dict[str, str], run_id: str
) -> None:
    response = client.get(f"/api/v1/runs/{run_id}", headers=viewer_headers)
    assert response.status_code == (404 if run_id == "999999" else 422)


# --- cancel and the worker's transitions -----------------------------------------------------


def _start(client: TestClient, headers: dict[str, str], dataset: Dataset) -> int:
    response = client.post("/api/v1/runs", json=run_body(dataset.name), headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_cancel_a_queued_run_then_cancel_again_is_409(
    client: TestClient, db_session: Session, editor_headers: dict[str, str], dataset: Dataset
) -> None:
    run_id = _start(client, editor_headers, dataset)
    response = client.post(f"/api/v1/runs/{run_id}/cancel", headers=editor_headers)
    assert response.status_code == 200
    run = response.json()
    assert run["status"] == "cancelled"
    assert run["finished_at"] is not None
    again = client.post(f"/api/v1/runs/{run_id}/cancel", headers=editor_headers)
    assert again.status_code == 409
    assert again.json()["detail"] == (
        f"run {run_id} is already cancelled; a finished run cannot become cancelled"
    )
    assert again.json()["run_status"] == "cancelled"
    actions = db_session.scalars(
        select(AuditEvent.action)
        .where(AuditEvent.resource_type == "run", AuditEvent.resource_id == str(run_id))
        .order_by(AuditEvent.id)
    ).all()
    assert actions == ["run.create", "run.cancel"]
    assert client.post("/api/v1/runs/999999/cancel", headers=editor_headers).status_code == 404


def test_a_run_goes_queued_running_succeeded_with_progress_metrics_and_model_version(
    client: TestClient,
    db_session: Session,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    dataset: Dataset,
) -> None:
    run_id = _start(client, editor_headers, dataset)
    run = service.get_run(db_session, run_id, for_update=True)
    service.mark_running(db_session, run)
    service.record_progress(db_session, run, 250)
    db_session.flush()
    shown = client.get(f"/api/v1/runs/{run_id}", headers=viewer_headers).json()
    assert shown["status"] == "running"
    assert shown["started_at"] is not None
    assert shown["heartbeat_at"] is not None
    assert (shown["events_replayed"], shown["events_total"], shown["progress"]) == (250, 1000, 0.25)

    model = RegisteredModel(name=f"m-{uuid.uuid4().hex[:8]}", description="")
    db_session.add(model)
    db_session.flush()
    version = ModelVersion(registered_model_id=model.id, version=1, run_id=run_id, metrics={})
    db_session.add(version)
    db_session.flush()
    service.record_progress(db_session, run, 1000)
    service.mark_succeeded(
        db_session,
        run,
        metrics={
            "auc": 0.91,
            "pr_auc": float("nan"),
            "per_class": {"1": {"f1": 0.7}},
            "note": "a\x00b",
        },
        mlflow_run_id="abc123",
        mlflow_url="http://127.0.0.1:5000/#/experiments/1/runs/abc123",
        model_version_id=version.id,
    )
    db_session.flush()
    shown = client.get(f"/api/v1/runs/{run_id}", headers=viewer_headers).json()
    assert shown["status"] == "succeeded"
    assert shown["progress"] == 1.0
    # NaN (an undefined metric) is stored as null and NUL dropped: JSONB can hold neither.
    assert shown["metrics"] == {
        "auc": 0.91,
        "pr_auc": None,
        "per_class": {"1": {"f1": 0.7}},
        "note": "ab",
    }
    assert (shown["mlflow_run_id"], shown["model_version_id"]) == ("abc123", version.id)
    assert shown["mlflow_url"].endswith("/runs/abc123")
    assert shown["finished_at"] is not None

    cancel = client.post(f"/api/v1/runs/{run_id}/cancel", headers=editor_headers)
    assert cancel.status_code == 409
    assert "already succeeded" in cancel.json()["detail"]
    for illegal in (
        lambda: service.mark_running(db_session, run),
        lambda: service.mark_failed(db_session, run, "late"),
        lambda: service.mark_succeeded(db_session, run, {}, None, None, None),
        lambda: service.record_progress(db_session, run, 5),
    ):
        with pytest.raises(Conflict, match=f"run {run_id} is (already )?succeeded"):
            illegal()
    actions = db_session.scalars(
        select(AuditEvent.action)
        .where(AuditEvent.resource_type == "run", AuditEvent.resource_id == str(run_id))
        .order_by(AuditEvent.id)
    ).all()
    assert actions == ["run.create", "run.start", "run.succeed"]


def test_a_running_run_can_fail_or_be_cancelled_and_a_queued_one_cannot_succeed(
    client: TestClient,
    db_session: Session,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    dataset: Dataset,
) -> None:
    failing = service.get_run(db_session, _start(client, editor_headers, dataset))
    with pytest.raises(Conflict, match="is queued; it cannot become succeeded"):
        service.mark_succeeded(db_session, failing, {}, None, None, None)
    with pytest.raises(Conflict, match="progress is recorded only while it is running"):
        service.record_progress(db_session, failing, 1)
    service.mark_running(db_session, failing)
    with pytest.raises(Conflict, match="is running; it cannot become running"):
        service.mark_running(db_session, failing)
    with pytest.raises(Invalid, match="must be >= 0"):
        service.record_progress(db_session, failing, -1)
    service.mark_failed(db_session, failing, "topic topic-x was deleted")
    db_session.flush()
    shown = client.get(f"/api/v1/runs/{failing.id}", headers=viewer_headers).json()
    assert (shown["status"], shown["error"]) == ("failed", "topic topic-x was deleted")
    assert shown["finished_at"] is not None
    assert (
        client.post(f"/api/v1/runs/{failing.id}/cancel", headers=editor_headers).status_code == 409
    )

    cancelled = service.get_run(db_session, _start(client, editor_headers, dataset))
    service.mark_running(db_session, cancelled)
    db_session.flush()
    response = client.post(f"/api/v1/runs/{cancelled.id}/cancel", headers=editor_headers)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    # The worker learns of the cancellation when it next reports progress or a result.
    with pytest.raises(Conflict, match="is cancelled; progress is recorded only while"):
        service.record_progress(db_session, cancelled, 10)
    with pytest.raises(Conflict, match="already cancelled"):
        service.mark_succeeded(db_session, cancelled, {}, None, None, None)

    never_started = service.get_run(db_session, _start(client, editor_headers, dataset))
    with pytest.raises(Invalid, match="at most 64 characters"):
        service.mark_succeeded(db_session, never_started, {}, "r" * 65, None, None)
    service.mark_failed(db_session, never_started, "\x00" + "x" * 30_000)
    db_session.flush()
    assert never_started.status == "failed"
    assert never_started.error == "x" * service.MAX_ERROR_CHARS


# --- the outbox and Celery -------------------------------------------------------------------


def test_the_relay_sends_the_task_only_once_the_run_is_visible_committed(
    client: TestClient,
    db_session: Session,
    engine: Engine,
    editor_headers: dict[str, str],
    stack_settings: Settings,
    dataset: Dataset,
    broker: redis.Redis,
) -> None:
    run_id = _start(client, editor_headers, dataset)
    task_id = f"run-{run_id}"
    # Another connection (as the relay of an API process has) cannot see the uncommitted row.
    with Session(engine) as elsewhere:
        assert outbox_rows(elsewhere, run_id) == []
        assert elsewhere.get(TrainingRun, run_id) is None

    relay = OutboxRelay(
        stack_settings.kafka_bootstrap,
        send_task=celery_sender_for(_celery(stack_settings.redis_url)),
    )
    relay.run_once(db_session)  # the relay in the transaction where the run exists
    message = take_task_message(broker, task_id)  # really in Redis, then removed
    assert message["headers"]["task"] == "carrara.training.train_run"
    args, kwargs, _embed = orjson.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([], {"run_id": run_id})
    (row,) = outbox_rows(db_session, run_id)
    assert row.published_at is not None
    assert row.attempts == 0
    relay.run_once(db_session)
    # send_task publishes before it returns: a second delivery would be in Redis already.
    assert not any(  # delivered once: nothing more for this task
        orjson.loads(raw)["headers"].get("id") == task_id
        for raw in broker.lrange(CELERY_QUEUE, 0, -1)
    )


def _celery(broker_url: str) -> Celery:
    """A real Celery client; against a dead broker it fails fast instead of retrying."""
    app = Celery("relay-test", broker=broker_url)
    app.conf.update(
        task_publish_retry=False,
        broker_connection_retry=False,
        broker_connection_max_retries=0,
        broker_connection_timeout=1,
        broker_transport_options={"socket_connect_timeout": 1, "socket_timeout": 1},
    )
    return app


def test_a_relay_that_cannot_reach_the_broker_keeps_the_task_for_later(
    client: TestClient,
    db_session: Session,
    editor_headers: dict[str, str],
    stack_settings: Settings,
    dataset: Dataset,
    broker: redis.Redis,
) -> None:
    run_id = _start(client, editor_headers, dataset)
    # A real Redis client against a port where nothing listens: the connection is refused.
    down = celery_sender_for(_celery("redis://127.0.0.1:1/0"))
    OutboxRelay(stack_settings.kafka_bootstrap, send_task=down).run_once(db_session)
    (row,) = outbox_rows(db_session, run_id)
    assert row.published_at is None
    assert row.attempts == 1
    assert row.last_error
    OutboxRelay(
        stack_settings.kafka_bootstrap,
        send_task=celery_sender_for(_celery(stack_settings.redis_url)),
    ).run_once(db_session)
    message = take_task_message(broker, f"run-{run_id}")
    assert message["headers"]["task"] == "carrara.training.train_run"
    assert outbox_rows(db_session, run_id)[0].published_at is not None


def test_a_started_run_reaches_the_real_celery_broker(
    live_api: LiveApi, engine: Engine, broker: redis.Redis
) -> None:
    with Session(engine) as setup, setup.begin():
        name = make_dataset(setup).name
    response = httpx.post(
        f"{live_api.url}/api/v1/runs",
        json=run_body(name),
        headers={"Authorization": f"Bearer {live_api.admin_token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    message = take_task_message(broker, f"run-{run_id}")
    assert message["headers"]["task"] == "carrara.training.train_run"
    assert message["properties"]["delivery_info"]["routing_key"] == CELERY_QUEUE
    args, kwargs, _embed = orjson.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([], {"run_id": run_id})
    with Session(engine) as check:
        (row,) = outbox_rows(check, run_id)
        assert row.published_at is not None
    assert not any(
        orjson.loads(raw)["headers"].get("id") == f"run-{run_id}"
        for raw in broker.lrange(CELERY_QUEUE, 0, -1)
    )
