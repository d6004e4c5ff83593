"""Models over the real API, Postgres and MLflow: import, lineage, aliases kept in sync, sync."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sklearn.linear_model import LogisticRegression
from sqlalchemy.orm import Session

from carrara.errors import Conflict
from carrara.models import Dataset, DatasetVersion, TrainingRun
from carrara.registry import service as registry
from carrara.settings import Settings, get_settings

API = "/api/v1/models"


@dataclass(frozen=True)
class LoggedModel:
    """A tiny sklearn model logged once per module; every test's versions point at it."""

    name: str
    run_id: str


@pytest.fixture(scope="module")
def logged_model(mlflow_experiment: str) -> LoggedModel:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(100, 2))
    labels = (features[:, 0] > 0).astype(int)
    model = LogisticRegression().fit(features, labels)
    name = f"carrara-test-models-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run() as run:
        mlflow.log_metric("auc", 0.93)
        mlflow.sklearn.log_model(
            model, name="model", registered_model_name=name, pip_requirements=["scikit-learn"]
        )
    return LoggedModel(name=name, run_id=run.info.run_id)


@pytest.fixture
def mlflow_client(stack_settings: Settings) -> MlflowClient:
    return MlflowClient(
        tracking_uri=stack_settings.mlflow_url, registry_uri=stack_settings.mlflow_url
    )


MakeModel = Callable[[int], str]


def add_version(client: MlflowClient, name: str, logged: LoggedModel) -> None:
    """A new MLflow registry version of `name` backed by the module's logged model."""
    # A registered-model source: MLflow resolves it to the same logged model and run.
    client.create_model_version(name, source=f"models:/{logged.name}/1")


@pytest.fixture
def mlflow_model(logged_model: LoggedModel, mlflow_client: MlflowClient) -> MakeModel:
    """Registers a fresh model with N versions in MLflow (real registry entries, shared run)."""

    def make(versions: int) -> str:
        name = f"carrara-test-{uuid.uuid4().hex[:10]}"
        mlflow_client.create_registered_model(name, description="made by a test")
        for _ in range(versions):
            add_version(mlflow_client, name, logged_model)
        return name

    return make


def test_import_a_version_trained_outside_carrara(
    client: TestClient,
    editor_headers: dict[str, str],
    mlflow_model: MakeModel,
    logged_model: LoggedModel,
) -> None:
    name = mlflow_model(2)
    response = client.post(f"{API}/{name}/versions", json={"version": 2}, headers=editor_headers)
    assert response.status_code == 201, response.text
    version = response.json()
    assert (version["model"], version["version"]) == (name, 2)
    assert version["mlflow_source"] == f"models:/{logged_model.name}/1"
    assert version["metrics"] == {"auc": 0.93}
    assert version["run"] is None  # not a Carrara run

    again = client.post(f"{API}/{name}/versions", json={"version": 2}, headers=editor_headers)
    assert again.status_code == 409
    assert "already imported" in again.json()["detail"]
    missing = client.post(f"{API}/{name}/versions", json={"version": 9}, headers=editor_headers)
    assert missing.status_code == 404
    assert "MLflow has no version 9" in missing.json()["detail"]
    unknown = client.post(
        f"{API}/no-such-model-{uuid.uuid4().hex[:6]}/versions",
        json={"version": 1},
        headers=editor_headers,
    )
    assert unknown.status_code == 404

    detail = client.get(f"{API}/{name}", headers=editor_headers).json()
    assert detail["description"] == "made by a test"
    assert [v["version"] for v in detail["versions"]] == [2]
    one = client.get(f"{API}/{name}/versions/2", headers=editor_headers)
    assert one.json()["mlflow_source"] == version["mlflow_source"]
    assert client.get(f"{API}/{name}/versions/1", headers=editor_headers).status_code == 404


def test_import_needs_an_editor_and_a_valid_body(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    mlflow_model: MakeModel,
) -> None:
    name = mlflow_model(1)
    refused = client.post(f"{API}/{name}/versions", json={"version": 1}, headers=viewer_headers)
    assert refused.status_code == 403
    assert client.post(f"{API}/{name}/versions", json={"version": 1}).status_code == 401
    for bad in ({"version": 0}, {"version": 2**31}, {"version": "one"}, {}, {"version": 1, "x": 1}):
        response = client.post(f"{API}/{name}/versions", json=bad, headers=editor_headers)
        assert response.status_code == 422, bad
    bad_name = client.post(f"{API}/bad name!/versions", json={"version": 1}, headers=editor_headers)
    assert bad_name.status_code == 422


def _lineage_rows(session: Session, mlflow_run_id: str | None) -> TrainingRun:
    dataset = Dataset(
        name=f"payments-{uuid.uuid4().hex[:6]}",
        topic="payments",
        key_field="user_id",
        task="binary",
        features=[{"name": "amount", "type": "float"}],
        label_field="fraud",
    )
    session.add(dataset)
    session.flush()
    snapshot = DatasetVersion(
        dataset_id=dataset.id,
        number=3,
        offsets=[{"partition": 0, "start": 0, "end": 1200}],
        event_count=1200,
    )
    session.add(snapshot)
    session.flush()
    run = TrainingRun(
        dataset_version_id=snapshot.id,
        algorithm="logistic_regression",
        params={"C": 1.0},
        registered_model_name="fraud",
        status="succeeded",
        mlflow_run_id=mlflow_run_id,
    )
    session.add(run)
    session.flush()
    return run


def test_lineage_links_a_version_to_its_run_and_dataset_snapshot(
    client: TestClient,
    editor_headers: dict[str, str],
    db_session: Session,
    mlflow_model: MakeModel,
    logged_model: LoggedModel,
) -> None:
    # A version registered by the training worker.
    run = _lineage_rows(db_session, mlflow_run_id=None)
    name = f"worker-model-{uuid.uuid4().hex[:6]}"
    row = registry.register_version(db_session, name, 1, run.id, "models:/m-1", {"f1": 0.8})
    assert run.model_version_id == row.id
    # A retried task gets the same row; anything else is a conflict.
    assert registry.register_version(db_session, name, 1, run.id, "models:/m-1", {}) is row
    with pytest.raises(Conflict):
        registry.register_version(db_session, name, 1, None, "models:/m-2", {})
    db_session.flush()

    version = client.get(f"{API}/{name}/versions/1", headers=editor_headers).json()
    assert version["metrics"] == {"f1": 0.8}
    assert version["run"]["id"] == run.id
    assert version["run"]["algorithm"] == "logistic_regression"
    lineage = version["run"]["dataset"]
    assert lineage["version"] == 3
    assert lineage["offsets"] == [{"partition": 0, "start": 0, "end": 1200}]
    assert lineage["event_count"] == 1200
    assert lineage["dataset"] == run.dataset_version.dataset.name

    # An imported MLflow version whose MLflow run is a Carrara run gets that lineage too.
    linked = _lineage_rows(db_session, mlflow_run_id=logged_model.run_id)
    imported_name = mlflow_model(1)
    imported = client.post(
        f"{API}/{imported_name}/versions", json={"version": 1}, headers=editor_headers
    )
    assert imported.status_code == 201, imported.text
    assert imported.json()["run"]["id"] == linked.id


def test_list_filters_by_name_prefix_and_paginates(
    client: TestClient, viewer_headers: dict[str, str], db_session: Session
) -> None:
    prefix = f"listed-{uuid.uuid4().hex[:6]}"
    for suffix in ("a", "b", "c"):
        registry.register_version(db_session, f"{prefix}-{suffix}", 1, None, "s", {})
    registry.register_version(db_session, f"{prefix}-c", 2, None, "s", {})
    db_session.flush()
    page = client.get(API, params={"name": prefix, "limit": 2}, headers=viewer_headers).json()
    assert [m["name"] for m in page["items"]] == [f"{prefix}-c", f"{prefix}-b"]
    assert (page["items"][0]["latest_version"], page["items"][0]["version_count"]) == (2, 2)
    rest = client.get(
        API,
        params={"name": prefix, "limit": 2, "cursor": page["next_cursor"]},
        headers=viewer_headers,
    ).json()
    assert [m["name"] for m in rest["items"]] == [f"{prefix}-a"]
    assert rest["next_cursor"] is None
    assert client.get(f"{API}/{prefix}-zzz", headers=viewer_headers).status_code == 404
    assert client.get(API, params={"cursor": "garbage"}, headers=viewer_headers).status_code == 422


def test_aliases_are_set_moved_and_removed_in_mlflow_and_carrara(
    client: TestClient,
    editor_headers: dict[str, str],
    mlflow_model: MakeModel,
    mlflow_client: MlflowClient,
) -> None:
    name = mlflow_model(2)
    for v in (1, 2):
        client.post(f"{API}/{name}/versions", json={"version": v}, headers=editor_headers)

    set_ = client.put(f"{API}/{name}/aliases/champion", json={"version": 1}, headers=editor_headers)
    assert set_.status_code == 200, set_.text
    assert set_.json() == {
        "model": name,
        "alias": "champion",
        "version": 1,
        "previous_version": None,
    }
    assert mlflow_client.get_model_version_by_alias(name, "champion").version == "1"

    moved = client.put(
        f"{API}/{name}/aliases/champion", json={"version": 2}, headers=editor_headers
    )
    assert moved.json()["previous_version"] == 1
    assert mlflow_client.get_model_version_by_alias(name, "champion").version == "2"
    detail = client.get(f"{API}/{name}", headers=editor_headers).json()
    assert detail["aliases"] == {"champion": 2}
    assert {v["version"]: v["aliases"] for v in detail["versions"]} == {2: ["champion"], 1: []}

    events = client.get(
        "/api/v1/audit",
        params={"action": "model.alias.set", "resource_id": name},
        headers=editor_headers,
    ).json()["items"]
    assert events[0]["before"] == {"alias": "champion", "version": 1}
    assert events[0]["after"] == {"alias": "champion", "version": 2}

    removed = client.delete(f"{API}/{name}/aliases/champion", headers=editor_headers)
    assert removed.status_code == 200
    assert removed.json()["version"] == 2
    with pytest.raises(MlflowException, match="champion"):
        mlflow_client.get_model_version_by_alias(name, "champion")
    assert client.get(f"{API}/{name}", headers=editor_headers).json()["aliases"] == {}
    gone = client.delete(f"{API}/{name}/aliases/champion", headers=editor_headers)
    assert gone.status_code == 404


@pytest.mark.parametrize(
    ("alias", "message"),
    [
        ("latest", "reserved"),
        ("v3", "version reference"),
        ("Champion", "alias"),
        ("9lives", "alias"),
        ("a" * 101, "alias"),
    ],
)
def test_alias_names_mlflow_refuses_are_422(
    client: TestClient,
    editor_headers: dict[str, str],
    db_session: Session,
    alias: str,
    message: str,
) -> None:
    name = f"alias-model-{uuid.uuid4().hex[:6]}"
    registry.register_version(db_session, name, 1, None, "s", {})
    db_session.flush()
    response = client.put(
        f"{API}/{name}/aliases/{alias}", json={"version": 1}, headers=editor_headers
    )
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_alias_on_a_version_carrara_lacks_is_404(
    client: TestClient, editor_headers: dict[str, str], mlflow_model: MakeModel
) -> None:
    name = mlflow_model(2)
    client.post(f"{API}/{name}/versions", json={"version": 1}, headers=editor_headers)
    response = client.put(
        f"{API}/{name}/aliases/champion", json={"version": 2}, headers=editor_headers
    )
    assert response.status_code == 404
    assert "no version 2 in Carrara" in response.json()["detail"]


def test_mlflow_unreachable_gives_503_and_changes_nothing(
    client: TestClient,
    editor_headers: dict[str, str],
    mlflow_model: MakeModel,
    mlflow_client: MlflowClient,
    test_settings: Settings,
) -> None:
    name = mlflow_model(2)
    for v in (1, 2):
        client.post(f"{API}/{name}/versions", json={"version": v}, headers=editor_headers)
    client.put(f"{API}/{name}/aliases/champion", json={"version": 1}, headers=editor_headers)

    down = test_settings.model_copy(update={"mlflow_url": "http://127.0.0.1:1"})
    client.app.dependency_overrides[get_settings] = lambda: down  # type: ignore[attr-defined]
    moved = client.put(
        f"{API}/{name}/aliases/champion", json={"version": 2}, headers=editor_headers
    )
    assert moved.status_code == 503
    assert "MLflow" in moved.json()["detail"]
    removed = client.delete(f"{API}/{name}/aliases/champion", headers=editor_headers)
    assert removed.status_code == 503
    imported = client.post(f"{API}/{name}/versions", json={"version": 3}, headers=editor_headers)
    assert imported.status_code == 503

    assert client.get(f"{API}/{name}", headers=editor_headers).json()["aliases"] == {"champion": 1}
    assert mlflow_client.get_model_version_by_alias(name, "champion").version == "1"


def test_sync_reconciles_versions_and_aliases_from_mlflow(
    client: TestClient,
    editor_headers: dict[str, str],
    mlflow_model: MakeModel,
    mlflow_client: MlflowClient,
    logged_model: LoggedModel,
) -> None:
    name = mlflow_model(1)
    mlflow_client.set_registered_model_alias(name, "champion", "1")
    # Import mirrors the aliases MLflow already has on that version.
    imported = client.post(f"{API}/{name}/versions", json={"version": 1}, headers=editor_headers)
    assert imported.json()["aliases"] == ["champion"]
    client.put(f"{API}/{name}/aliases/stale", json={"version": 1}, headers=editor_headers)

    # Changes made in MLflow directly: a new version, aliases moved, added and removed.
    add_version(mlflow_client, name, logged_model)
    mlflow_client.set_registered_model_alias(name, "champion", "2")
    mlflow_client.set_registered_model_alias(name, "challenger", "1")
    mlflow_client.set_registered_model_alias(name, "Shouty", "1")
    mlflow_client.delete_registered_model_alias(name, "stale")

    synced = client.post(f"{API}/{name}/sync", headers=editor_headers)
    assert synced.status_code == 200, synced.text
    result = synced.json()
    assert result["imported_versions"] == [2]
    assert result["aliases_set"] == {"challenger": 1, "champion": 2}
    assert result["aliases_removed"] == ["stale"]
    assert result["aliases_skipped"] == ["Shouty"]
    assert result["model"]["aliases"] == {"challenger": 1, "champion": 2}

    # A second sync finds nothing to do.
    again = client.post(f"{API}/{name}/sync", headers=editor_headers).json()
    assert (again["imported_versions"], again["aliases_set"], again["aliases_removed"]) == (
        [],
        {},
        [],
    )
    missing = client.post(f"{API}/no-such-{uuid.uuid4().hex[:6]}/sync", headers=editor_headers)
    assert missing.status_code == 404
