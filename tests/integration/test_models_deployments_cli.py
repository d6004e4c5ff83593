"""`carrara models ...`, `carrara deploy -f` and `carrara deployments ...` against a live API."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import orjson
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sklearn.linear_model import LogisticRegression
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from carrara.registry import service as registry
from carrara.settings import Settings
from tests.integration.conftest import LiveApi, run_cli


def _json(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


def test_models_cli_imports_shows_and_aliases(
    live_api: LiveApi, stack_settings: Settings, mlflow_experiment: str
) -> None:
    rng = np.random.default_rng(5)
    features = rng.normal(size=(60, 2))
    model = LogisticRegression().fit(features, (features[:, 0] > 0).astype(int))
    name = f"cli-model-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run():
        mlflow.log_metric("auc", 0.91)
        mlflow.sklearn.log_model(
            model, name="model", registered_model_name=name, pip_requirements=["scikit-learn"]
        )
    client = MlflowClient(tracking_uri=stack_settings.mlflow_url)

    imported = _json(run_cli(live_api, "models", "import", name, "--version", "1", "--json"))
    assert (imported["model"], imported["version"], imported["metrics"]) == (
        name,
        1,
        {"auc": 0.91},
    )
    again = run_cli(live_api, "models", "import", name, "--version", "1")
    assert again.returncode == 2
    assert "already imported" in again.stderr

    listed = _json(run_cli(live_api, "models", "list", "--name", name, "--json"))
    assert [(m["name"], m["latest_version"]) for m in listed] == [(name, 1)]
    table = run_cli(live_api, "models", "show", name)
    assert table.returncode == 0, table.stderr
    assert name in table.stdout
    assert "imported from MLflow" in table.stdout
    assert "auc=0.91" in table.stdout

    aliased = run_cli(live_api, "models", "alias", name, "champion", "--version", "1")
    assert aliased.returncode == 0, aliased.stderr
    assert f"{name}@champion → v1" in aliased.stdout
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    shown = _json(run_cli(live_api, "models", "show", name, "--json"))
    assert shown["aliases"] == {"champion": 1}

    reserved = run_cli(live_api, "models", "alias", name, "latest", "--version", "1")
    assert reserved.returncode == 2
    assert "reserved" in reserved.stderr

    removed = _json(run_cli(live_api, "models", "unalias", name, "champion", "--json"))
    assert removed["version"] == 1
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "champion")

    client.set_registered_model_alias(name, "challenger", "1")
    synced = _json(run_cli(live_api, "models", "sync", name, "--json"))
    assert synced["aliases_set"] == {"challenger": 1}
    missing = run_cli(live_api, "models", "show", f"no-such-{uuid.uuid4().hex[:6]}")
    assert missing.returncode == 2
    assert "not registered" in missing.stderr


def test_deploy_and_deployments_cli_cover_the_lifecycle(
    live_api: LiveApi, engine: Engine, io_topics: tuple[str, str], tmp_path: Path
) -> None:
    model = f"cli-deploy-model-{uuid.uuid4().hex[:8]}"
    with Session(engine) as session, session.begin():
        for version in (1, 2):
            registry.register_version(session, model, version, None, "models:/m-cli", {})
    name = f"cli-{uuid.uuid4().hex[:8]}"
    document: dict[str, Any] = {
        "name": name,
        "input_topic": io_topics[0],
        "output_topic": io_topics[1],
        "key_field": "user_id",
        "variants": [
            {"name": "a", "model": model, "version": 1, "weight": 100},
            {"name": "s", "model": model, "version": 2, "shadow": True},
        ],
    }
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(document))

    first = run_cli(live_api, "deploy", "-f", str(path))
    assert first.returncode == 0, first.stderr
    assert f"deployment {name}: revision 1 (changed: new revision)" in first.stdout
    same = run_cli(live_api, "deploy", "-f", str(path))
    assert f"deployment {name}: revision 1 (unchanged)" in same.stdout
    assert _json(run_cli(live_api, "deploy", "-f", str(path), "--json"))["changed"] is False

    document["variants"][0]["version"] = 2
    path.write_text(yaml.safe_dump(document))
    second = _json(run_cli(live_api, "deploy", "-f", str(path), "--reason", "v2", "--json"))
    assert (second["revision"], second["changed"]) == (2, True)

    listed = _json(run_cli(live_api, "deployments", "list", "--name", name, "--json"))
    assert [(d["name"], d["status"], d["revision"]) for d in listed] == [(name, "running", 2)]
    shown = run_cli(live_api, "deployments", "show", name)
    assert shown.returncode == 0, shown.stderr
    assert "running" in shown.stdout
    assert f"{io_topics[0]} → {io_topics[1]}" in shown.stdout
    assert "yes (100%)" in shown.stdout  # the shadow variant
    history = _json(run_cli(live_api, "deployments", "history", name, "--json"))
    assert [(r["number"], r["reason"]) for r in history] == [(2, "v2"), (1, "")]
    table = run_cli(live_api, "deployments", "history", name)
    assert table.returncode == 0, table.stderr

    rolled = run_cli(live_api, "deployments", "rollback", name, "--to", "1")
    assert rolled.returncode == 0, rolled.stderr
    assert f"deployment {name}: revision 3" in rolled.stdout
    again = run_cli(live_api, "deployments", "rollback", name, "--to", "1")
    assert again.returncode == 2
    assert "already runs the spec of revision 1" in again.stderr

    stopped = _json(run_cli(live_api, "deployments", "delete", name, "--reason", "done", "--json"))
    assert (stopped["status"], stopped["revision"]) == ("stopped", 4)
    twice = run_cli(live_api, "deployments", "delete", name)
    assert twice.returncode == 2
    assert "already stopped" in twice.stderr
    assert _json(run_cli(live_api, "deployments", "show", name, "--json"))["spec"] is None
    stopped_list = run_cli(live_api, "deployments", "list", "--status", "stopped", "--name", name)
    assert name in stopped_list.stdout


def test_deploy_reports_bad_files_and_unreachable_apis(
    live_api: LiveApi, io_topics: tuple[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "name": f"cli-bad-{uuid.uuid4().hex[:6]}",
                "input_topic": io_topics[0],
                "output_topic": io_topics[1],
                "key_field": "user_id",
                "variants": [{"name": "a", "model": "m", "version": 1, "weight": 90}],
            }
        )
    )
    refused = run_cli(live_api, "deploy", "-f", str(bad))
    assert refused.returncode == 2
    assert "sum to 100, got 90" in refused.stderr

    nameless = tmp_path / "nameless.yaml"
    nameless.write_text(yaml.safe_dump({"input_topic": io_topics[0]}))
    missing_name = run_cli(live_api, "deploy", "-f", str(nameless))
    assert missing_name.returncode == 1
    assert "needs a `name`" in missing_name.stderr

    unreachable = dataclasses.replace(
        live_api, env={**live_api.env, "CARRARA_API_URL": "http://127.0.0.1:1"}
    )
    down = run_cli(unreachable, "deploy", "-f", str(bad))
    assert down.returncode == 3
    assert "cannot reach the Carrara API" in down.stderr
