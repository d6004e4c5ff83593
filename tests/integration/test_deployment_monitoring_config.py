"""A deployment's optional `monitoring` and `policy`: validation, storage, revisions."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.deployments import service
from carrara.deployments.schemas import MonitoringConfig, Policy
from carrara.models import (
    Dataset,
    DatasetVersion,
    Deployment,
    ModelVersion,
    OutboxMessage,
    TrainingRun,
)
from carrara.registry import service as registry
from carrara.settings import Settings, get_settings
from carrara.streams.topics import TopicAdmin

API = "/api/v1/deployments"
DEFAULTS = {
    "outcomes_topic": None,
    "outcome_field": "label",
    "join_by": "key",
    "window_s": 86400,
    "metric": None,
    "champion": None,
    "drift_psi_threshold": 0.2,
    "alpha": 0.05,
}
POLICY_DEFAULTS = {
    "auto_promote": False,
    "auto_rollback": False,
    "min_outcomes": 1000,
    "max_dead_letter_rate": 0.05,
}


def make_version(
    session: Session, model: str, version: int, task: str | None = None
) -> ModelVersion:
    """A model version; with `task`, trained (per its run) on a dataset of that task."""
    run_id = None
    if task is not None:
        dataset = Dataset(
            name=f"ds-{model}-{version}",
            topic=f"topic-{model}",
            key_field="user_id",
            label_field="label",
            task=task,
            features=[{"name": "amount", "type": "float"}],
        )
        session.add(dataset)
        session.flush()
        dataset_version = DatasetVersion(
            dataset_id=dataset.id,
            number=1,
            offsets=[{"partition": 0, "start": 0, "end": 10}],
            event_count=10,
        )
        session.add(dataset_version)
        session.flush()
        run = TrainingRun(
            dataset_version_id=dataset_version.id,
            algorithm="logistic_regression",
            registered_model_name=model,
            status="succeeded",
        )
        session.add(run)
        session.flush()
        run_id = run.id
    row = registry.register_version(session, model, version, run_id, f"models:/{model}/1", {})
    session.flush()
    return row


@pytest.fixture
def models(db_session: Session) -> dict[str, ModelVersion]:
    return {
        "clf": make_version(db_session, "mon-clf", 1, task="binary"),
        "clf2": make_version(db_session, "mon-clf", 2, task="binary"),
        "reg": make_version(db_session, "mon-reg", 1, task="regression"),
        "unknown": make_version(db_session, "mon-imported", 1),
    }


def body(monitored_topics: tuple[str, ...], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input_topic": monitored_topics[0],
        "output_topic": monitored_topics[1],
        "key_field": "user_id",
        "variants": [
            {"name": "a", "model": "mon-clf", "version": 1, "weight": 70},
            {"name": "b", "model": "mon-clf", "version": 2, "weight": 30},
            {"name": "s", "model": "mon-clf", "version": 2, "shadow": True},
        ],
    }
    spec.update(overrides)
    return spec


@pytest.mark.usefixtures("models")
def test_monitoring_and_policy_are_stored_in_a_new_revision_and_returned(
    client: TestClient,
    editor_headers: dict[str, str],
    monitored_topics: tuple[str, str, str],
    db_session: Session,
) -> None:
    first = client.put(f"{API}/mon", json=body(monitored_topics), headers=editor_headers)
    assert first.status_code == 201, first.text
    assert "monitoring" not in first.json()["spec"]
    assert "policy" not in first.json()["spec"]

    monitoring = {"outcomes_topic": monitored_topics[2], "champion": "b", "metric": "accuracy"}
    policy = {"auto_rollback": True, "min_outcomes": 50}
    second = client.put(
        f"{API}/mon",
        json=body(monitored_topics, monitoring=monitoring, policy=policy, reason="watch it"),
        headers=editor_headers,
    )
    assert second.status_code == 201, second.text
    stored = {**DEFAULTS, **monitoring}
    assert second.json()["spec"]["monitoring"] == stored
    assert second.json()["spec"]["policy"] == {**POLICY_DEFAULTS, **policy}
    shown = client.get(f"{API}/mon", headers=editor_headers).json()
    assert (shown["revision"], shown["spec"]["monitoring"]) == (2, stored)

    # The defaults written out or left implicit are the same desired state.
    explicit = body(monitored_topics, monitoring=stored, policy={**POLICY_DEFAULTS, **policy})
    again = client.put(f"{API}/mon", json=explicit, headers=editor_headers)
    assert (again.status_code, again.json()["revision"]) == (200, 2)

    history = client.get(f"{API}/mon/revisions", headers=editor_headers).json()["items"]
    assert history[0]["spec"]["monitoring"] == stored
    assert "monitoring" not in history[1]["spec"]
    events = client.get(
        "/api/v1/audit",
        params={"resource_type": "deployment", "resource_id": "mon"},
        headers=editor_headers,
    ).json()["items"]
    change = next(e for e in events if e["detail"] == "revision 2: watch it")
    assert "monitoring" not in change["before"]
    assert change["after"]["monitoring"] == stored
    assert change["after"]["policy"]["auto_rollback"] is True

    # Scorers do not need it: the wire record is unchanged in shape.
    payload = db_session.scalars(
        select(OutboxMessage.payload).where(OutboxMessage.key == "mon").order_by(OutboxMessage.id)
    ).all()[-1]
    assert payload is not None
    assert "monitoring" not in payload
    assert "policy" not in payload

    # Dropping the config is a change too.
    dropped = client.put(f"{API}/mon", json=body(monitored_topics), headers=editor_headers)
    assert (dropped.status_code, dropped.json()["revision"]) == (201, 3)


@pytest.mark.usefixtures("models")
def test_a_body_without_monitoring_keeps_its_spec_hash(
    client: TestClient, editor_headers: dict[str, str], monitored_topics: tuple[str, str, str]
) -> None:
    created = client.put(f"{API}/plain", json=body(monitored_topics), headers=editor_headers)
    assert created.status_code == 201
    revision = client.get(f"{API}/plain/revisions", headers=editor_headers).json()["items"][0]
    # The hash of the spec as stored before monitoring existed (no monitoring/policy keys).
    old_form = {
        "input_topic": monitored_topics[0],
        "output_topic": monitored_topics[1],
        "key_field": "user_id",
        "pool": "default",
        "description": "",
        "variants": [
            {
                "name": "a",
                "model": "mon-clf",
                "version": 1,
                "weight": 70,
                "shadow": False,
                "shadow_sample_pct": None,
            },
            {
                "name": "b",
                "model": "mon-clf",
                "version": 2,
                "weight": 30,
                "shadow": False,
                "shadow_sample_pct": None,
            },
            {
                "name": "s",
                "model": "mon-clf",
                "version": 2,
                "weight": 0,
                "shadow": True,
                "shadow_sample_pct": 100.0,
            },
        ],
    }
    assert revision["spec_hash"] == service.spec_hash(old_form)
    explicit_nulls = body(monitored_topics, monitoring=None, policy=None)
    same = client.put(f"{API}/plain", json=explicit_nulls, headers=editor_headers)
    assert (same.status_code, same.json()["changed"], same.json()["revision"]) == (200, False, 1)


@pytest.mark.usefixtures("models")
def test_outcomes_topic_must_exist_and_kafka_must_answer(
    client: TestClient,
    editor_headers: dict[str, str],
    monitored_topics: tuple[str, str, str],
    test_settings: Settings,
) -> None:
    missing = f"{monitored_topics[2]}-missing"
    response = client.put(
        f"{API}/mon",
        json=body(monitored_topics, monitoring={"outcomes_topic": missing}),
        headers=editor_headers,
    )
    assert response.status_code == 422, response.text
    assert response.json()["missing"] == [missing]
    assert missing in response.json()["detail"]
    assert client.get(f"{API}/mon", headers=editor_headers).status_code == 404

    down = test_settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    client.app.dependency_overrides[get_settings] = lambda: down  # type: ignore[attr-defined]
    unreachable = client.put(
        f"{API}/mon",
        json=body(monitored_topics, monitoring={"outcomes_topic": monitored_topics[2]}),
        headers=editor_headers,
    )
    assert unreachable.status_code == 503
    assert "Kafka" in unreachable.json()["detail"]


@pytest.mark.usefixtures("models")
def test_rollback_checks_the_outcomes_topic_still_exists(
    client: TestClient,
    editor_headers: dict[str, str],
    monitored_topics: tuple[str, str, str],
    stack_settings: Settings,
) -> None:
    watched = body(monitored_topics, monitoring={"outcomes_topic": monitored_topics[2]})
    assert client.put(f"{API}/mon", json=watched, headers=editor_headers).status_code == 201
    assert (
        client.put(f"{API}/mon", json=body(monitored_topics), headers=editor_headers).status_code
        == 201
    )
    TopicAdmin(stack_settings.kafka_bootstrap).delete_topics([monitored_topics[2]])
    refused = client.post(f"{API}/mon/rollback", json={"revision": 1}, headers=editor_headers)
    assert refused.status_code == 422, refused.text
    assert refused.json()["missing"] == [monitored_topics[2]]


@pytest.mark.parametrize(
    ("monitoring", "policy", "message"),
    [
        ({"champion": "zz"}, None, "monitoring.champion 'zz' is not a live variant"),
        ({"champion": "s"}, None, "monitoring.champion 's' is not a live variant"),
        ({"champion": "Not A Slug"}, None, "monitoring.champion"),
        ({"window_s": 59}, None, "monitoring.window_s"),
        ({"window_s": 30 * 86400 + 1}, None, "monitoring.window_s"),
        ({"metric": "auc"}, None, "monitoring.metric"),
        ({"join_by": "time"}, None, "monitoring.join_by"),
        ({"alpha": 0}, None, "monitoring.alpha"),
        ({"drift_psi_threshold": -1}, None, "monitoring.drift_psi_threshold"),
        ({"outcomes_topic": "bad topic!"}, None, "monitoring.outcomes_topic"),
        ({"outcome_field": ""}, None, "monitoring.outcome_field"),
        ({"outcome_feild": "y"}, None, "monitoring.outcome_feild"),
        ({"outcomes_topic": "OUT"}, None, "outcomes_topic must differ from output_topic"),
        (None, {"min_outcomes": 0}, "policy.min_outcomes"),
        (None, {"min_outcomes": 2**63}, "policy.min_outcomes"),
        (None, {"max_dead_letter_rate": 1.5}, "policy.max_dead_letter_rate"),
        (None, {"auto_promote": "sometimes"}, "policy.auto_promote"),
        (None, {"rollback": True}, "policy.rollback"),
    ],
)
def test_bad_monitoring_and_policy_are_refused_with_a_precise_422(
    client: TestClient,
    editor_headers: dict[str, str],
    monitoring: dict[str, Any] | None,
    policy: dict[str, Any] | None,
    message: str,
) -> None:
    spec = body(("IN", "OUT"), monitoring=copy.deepcopy(monitoring), policy=copy.deepcopy(policy))
    response = client.put(f"{API}/mon", json=spec, headers=editor_headers)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


@pytest.mark.usefixtures("models")
@pytest.mark.parametrize(
    ("champion_model", "metric", "accepted"),
    [
        ("mon-clf", "log_loss", True),
        ("mon-clf", "accuracy", True),
        ("mon-clf", "rmse", False),
        ("mon-reg", "rmse", True),
        ("mon-reg", "mae", True),
        ("mon-reg", "log_loss", False),
        ("mon-reg", "accuracy", False),
        ("mon-imported", "accuracy", True),  # unknown task: accepted
        ("mon-imported", "rmse", True),
    ],
)
def test_the_metric_must_suit_the_champion_models_task(
    client: TestClient,
    editor_headers: dict[str, str],
    monitored_topics: tuple[str, str, str],
    champion_model: str,
    metric: str,
    accepted: bool,
) -> None:
    spec = body(
        monitored_topics,
        variants=[
            {"name": "champ", "model": champion_model, "version": 1, "weight": 60},
            {"name": "other", "model": "mon-reg", "version": 1, "weight": 40},
        ],
        monitoring={"metric": metric},
    )
    response = client.put(f"{API}/mon", json=spec, headers=editor_headers)
    if accepted:
        assert response.status_code == 201, response.text
        return
    assert response.status_code == 422, response.text
    task = "binary" if champion_model == "mon-clf" else "regression"
    assert response.json()["detail"].startswith(f"monitoring.metric '{metric}' needs a ")
    assert f"champion 'champ' ({champion_model} v1) is a {task} model" in response.json()["detail"]


def test_the_task_comes_from_the_feature_profile_without_a_run(
    client: TestClient,
    editor_headers: dict[str, str],
    monitored_topics: tuple[str, str, str],
    db_session: Session,
) -> None:
    row = make_version(db_session, "mon-profiled", 1)
    row.feature_profile = {"task": "regression", "features": {}}
    db_session.flush()
    assert service.model_task(db_session, "mon-profiled", 1) == "regression"
    spec = body(
        monitored_topics,
        variants=[{"name": "a", "model": "mon-profiled", "version": 1, "weight": 100}],
        monitoring={"metric": "log_loss"},
    )
    response = client.put(f"{API}/mon", json=spec, headers=editor_headers)
    assert response.status_code == 422
    assert "is a regression model" in response.json()["detail"]


@pytest.mark.usefixtures("models")
def test_monitoring_config_helper_gives_the_monitor_the_current_config(
    client: TestClient,
    editor_headers: dict[str, str],
    monitored_topics: tuple[str, str, str],
    db_session: Session,
) -> None:
    client.put(f"{API}/mon", json=body(monitored_topics), headers=editor_headers)
    deployment = db_session.scalars(select(Deployment).where(Deployment.name == "mon")).one()
    assert service.monitoring_config(deployment) == (None, None)
    _, current = service.get_deployment(db_session, "mon")
    assert current.spec is not None
    assert service.champion_of(current.spec) == "a"  # the largest live weight
    assert service.verdict_metric(db_session, current.spec) == "log_loss"  # binary model

    watched = body(
        monitored_topics,
        monitoring={"outcomes_topic": monitored_topics[2], "champion": "b", "alpha": 0.01},
        policy={"auto_promote": True},
    )
    client.put(f"{API}/mon", json=watched, headers=editor_headers)
    db_session.refresh(deployment)
    config, policy = service.monitoring_config(deployment)
    assert config == MonitoringConfig(outcomes_topic=monitored_topics[2], champion="b", alpha=0.01)
    assert policy == Policy(auto_promote=True)
    _, current = service.get_deployment(db_session, "mon")
    assert current.spec is not None
    assert service.champion_of(current.spec) == "b"

    client.delete(f"{API}/mon", headers=editor_headers)
    db_session.refresh(deployment)
    assert service.monitoring_config(deployment) == (None, None)
