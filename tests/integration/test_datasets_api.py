"""Datasets over the REST API, against the real Postgres and Kafka."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.datasets import service
from carrara.models import AuditEvent, Dataset, TrainingRun
from carrara.settings import Settings, get_settings
from carrara.streams.topics import TopicAdmin

URL = "/api/v1/datasets"


def dataset_body(name: str, topic: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "topic": topic,
        "key_field": "user",
        "event_time_field": "ts",
        "features": [
            {"name": "amount", "type": "float"},
            {"name": "items", "type": "int"},
            {"name": "country", "type": "category"},
        ],
        "label_field": "fraud",
        "task": "binary",
        "description": "card payments",
        "owner": "risk-team",
    }
    body.update(overrides)
    return body


def good_event(i: int, **overrides: Any) -> dict[str, Any]:
    event = {
        "user": f"u{i}",
        "ts": 1_714_564_800_000 + i,
        "amount": 10.5 + i,
        "items": i % 4,
        "country": ["FR", "DE", "IT"][i % 3],
        "fraud": i % 7 == 0,
    }
    event.update(overrides)
    return event


def produce(bootstrap: str, topic: str, values: list[bytes], partitions: int = 1) -> None:
    # A plain producer: the idempotent one costs half a second to start, per call.
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, partition=i % partitions)
    assert producer.flush(30) == 0


def encoded(events: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


@pytest.fixture
def topic(stack_settings: Settings, topic_name: str) -> str:
    """An empty 3-partition topic."""
    TopicAdmin(stack_settings.kafka_bootstrap).create_topic(topic_name, partitions=3)
    return topic_name


def test_create_checks_the_schema_against_recent_events(
    client: TestClient,
    editor_headers: dict[str, str],
    stack_settings: Settings,
    topic: str,
    db_session: Session,
) -> None:
    produce(stack_settings.kafka_bootstrap, topic, encoded([good_event(i) for i in range(30)]), 3)

    response = client.post(URL, json=dataset_body("payments", topic), headers=editor_headers)

    assert response.status_code == 201, response.text
    created = response.json()
    assert created["sample_size"] == 30
    assert created["topic_created"] is False
    assert created["created_by"] == "test-editor"
    assert created["features"][0] == {"name": "amount", "type": "float"}
    shown = client.get(f"{URL}/payments", headers=editor_headers).json()
    assert {k: shown[k] for k in ("topic", "key_field", "label_field", "task", "owner")} == {
        "topic": topic,
        "key_field": "user",
        "label_field": "fraud",
        "task": "binary",
        "owner": "risk-team",
    }
    audit = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "dataset.create", AuditEvent.actor == "test-editor"
        )
    ).one()
    assert audit.resource_id == "payments"
    assert audit.after is not None
    assert audit.after["topic"] == topic
    assert audit.detail == "schema checked against 30 recent events"


def test_a_schema_that_disagrees_with_the_events_is_422_naming_each_field(
    client: TestClient,
    editor_headers: dict[str, str],
    stack_settings: Settings,
    topic: str,
    db_session: Session,
) -> None:
    events = [good_event(i) for i in range(20)]
    events[3]["amount"] = "12.50"  # a string where a float is declared
    events[5]["amount"] = "n/a"
    del events[8]["items"]  # a missing feature
    produce(stack_settings.kafka_bootstrap, topic, encoded(events), 3)

    response = client.post(URL, json=dataset_body("payments", topic), headers=editor_headers)

    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["detail"] == (
        f"the schema does not match 20 recent events of topic '{topic}': check 'amount', 'items'"
    )
    assert problem["sample_size"] == 20
    errors = {e["field"]: e for e in problem["errors"]}
    assert set(errors) == {"amount", "items"}
    assert errors["amount"]["events"] == 2
    assert "got string in 2 of 20 sampled events" in errors["amount"]["message"]
    assert errors["items"]["message"] == (
        "expected int (a JSON integer): missing in 1 of 20 sampled events"
    )
    assert db_session.scalar(select(Dataset).where(Dataset.name == "payments")) is None


def test_events_that_are_not_json_objects_count_as_mismatches(
    client: TestClient, editor_headers: dict[str, str], stack_settings: Settings, topic: str
) -> None:
    values = [*encoded([good_event(i) for i in range(5)]), b"plain text", b"[1, 2, 3]"]
    produce(stack_settings.kafka_bootstrap, topic, values)

    response = client.post(URL, json=dataset_body("payments", topic), headers=editor_headers)

    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error["field"] == "(event)"
    assert error["events"] == 2
    assert "1 of 7 are not JSON" in error["message"]


def test_only_the_most_recent_events_are_checked(
    client: TestClient, editor_headers: dict[str, str], stack_settings: Settings, topic: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    # Old events used another schema; the newest 200 (the sample) follow the declared one.
    produce(bootstrap, topic, encoded([{"legacy": i} for i in range(90)]), 3)
    produce(bootstrap, topic, encoded([good_event(i) for i in range(201)]), 3)

    response = client.post(URL, json=dataset_body("payments", topic), headers=editor_headers)

    assert response.status_code == 201, response.text
    assert response.json()["sample_size"] == service.SAMPLE_SIZE == 200


def test_an_empty_topic_has_nothing_to_check(
    client: TestClient, editor_headers: dict[str, str], topic: str
) -> None:
    body = dataset_body("unlabeled", topic, task="anomaly", label_field=None)
    response = client.post(URL, json=body, headers=editor_headers)
    assert response.status_code == 201, response.text
    assert response.json()["sample_size"] == 0
    assert response.json()["label_field"] is None


def test_create_topic_makes_the_topic_and_refuses_an_existing_one(
    client: TestClient, editor_headers: dict[str, str], stack_settings: Settings, topic_name: str
) -> None:
    body = dataset_body("fresh", topic_name, create_topic={"partitions": 4})
    response = client.post(URL, json=body, headers=editor_headers)
    assert response.status_code == 201, response.text
    assert response.json()["topic_created"] is True
    assert TopicAdmin(stack_settings.kafka_bootstrap).partitions(topic_name) == [0, 1, 2, 3]

    again = dataset_body("fresh-2", topic_name, create_topic={"partitions": 2})
    response = client.post(URL, json=again, headers=editor_headers)
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"topic '{topic_name}' already exists (with 4 partitions): "
        "leave out `create_topic` to use it"
    )


def test_a_topic_that_does_not_exist_is_422(
    client: TestClient, editor_headers: dict[str, str], topic_name: str
) -> None:
    response = client.post(URL, json=dataset_body("ghost", topic_name), headers=editor_headers)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"topic '{topic_name}' does not exist in Kafka")
    assert response.json()["errors"] == [{"field": "topic", "message": "no such Kafka topic"}]


def test_a_duplicate_name_is_409(
    client: TestClient, editor_headers: dict[str, str], topic: str
) -> None:
    assert client.post(URL, json=dataset_body("dup", topic), headers=editor_headers).is_success
    response = client.post(URL, json=dataset_body("dup", topic), headers=editor_headers)
    assert response.status_code == 409
    assert response.json()["detail"] == "dataset 'dup' already exists"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"label_field": None}, "label_field is required for a binary task"),
        ({"label_field": "amount"}, "label field 'amount' must not also be a feature"),
        ({"label_field": "user"}, "the key, label and event-time fields must be different"),
        (
            {"features": [{"name": "user", "type": "category"}]},
            "key field 'user' must not also be a feature",
        ),
        (
            {"features": [{"name": "ts", "type": "int"}, {"name": "a", "type": "float"}]},
            "event time field 'ts' must not also be a feature",
        ),
        (
            {"features": [{"name": "memo", "type": "string"}]},
            "at least one feature must be float, int, bool or category",
        ),
        (
            {"features": [{"name": "a", "type": "float"}, {"name": "a", "type": "int"}]},
            "feature names must be unique; repeated: a",
        ),
        ({"features": []}, "features: List should have at least 1 item"),
        ({"features": [{"name": "a", "type": "decimal"}]}, "features.0.type: Input should be"),
        ({"name": "Has Spaces"}, "name: String should match pattern"),
        ({"topic": "bad topic!"}, "topic: String should match pattern"),
        ({"topic": ".."}, "'.' and '..' are not valid Kafka topic names"),
        ({"task": "clustering"}, "task: Input should be"),
        ({"create_topic": {"partitions": 0}}, "create_topic.partitions: Input should be greater"),
        ({"create_topic": {"partitions": 1001}}, "create_topic.partitions: Input should be less"),
        ({"description": "nul\x00byte"}, "description: String should match pattern"),
        ({"key_field": "ctl\x01"}, "key_field: String should match pattern"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_invalid_bodies_are_422_with_the_reason(
    client: TestClient,
    editor_headers: dict[str, str],
    overrides: dict[str, Any],
    message: str,
) -> None:
    body = {**dataset_body("bad", "some-topic"), **overrides}
    response = client.post(URL, json=body, headers=editor_headers)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_roles_and_tokens(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    topic: str,
) -> None:
    response = client.post(URL, json=dataset_body("ds", topic), headers=viewer_headers)
    assert response.status_code == 403
    assert "needs the editor role" in response.json()["detail"]
    assert client.get(URL).status_code == 401
    assert client.get(f"{URL}/ds").status_code == 401
    assert client.post(URL, json=dataset_body("ds", topic)).status_code == 401

    assert client.post(URL, json=dataset_body("ds", topic), headers=editor_headers).is_success
    assert client.get(f"{URL}/ds", headers=viewer_headers).status_code == 200
    assert client.patch(f"{URL}/ds", json={}, headers=viewer_headers).status_code == 403
    assert client.delete(f"{URL}/ds", headers=viewer_headers).status_code == 403


def test_unknown_datasets_are_404(client: TestClient, editor_headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", f"{URL}/nope"),
        ("PATCH", f"{URL}/nope"),
        ("DELETE", f"{URL}/nope"),
        ("GET", f"{URL}/nope/versions"),
        ("GET", f"{URL}/nope/versions/1"),
        ("POST", f"{URL}/nope/versions"),
    ]:
        kwargs: dict[str, Any] = {"json": {}} if method in ("PATCH", "POST") else {}
        response = client.request(method, path, headers=editor_headers, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"] == "dataset 'nope' does not exist"


def test_list_filters_by_name_prefix_and_topic_and_paginates(
    client: TestClient,
    editor_headers: dict[str, str],
    viewer_headers: dict[str, str],
    stack_settings: Settings,
    topic: str,
    topic_name: str,
) -> None:
    # The live API (other tests) commits datasets to the same database: names are unique here.
    p = f"ls{uuid.uuid4().hex[:8]}"
    a, b, churn, c = f"{p}-a", f"{p}-b", f"{p}.churn", f"{p}_c"
    for name in (a, b, churn):
        response = client.post(URL, json=dataset_body(name, topic), headers=editor_headers)
        assert response.status_code == 201
    other_topic = f"{topic_name}-other"
    body = dataset_body(c, other_topic, create_topic={"partitions": 1})
    try:
        assert client.post(URL, json=body, headers=editor_headers).status_code == 201

        def names(**params: Any) -> list[str]:
            response = client.get(URL, params=params, headers=viewer_headers)
            assert response.status_code == 200, response.text
            return [d["name"] for d in response.json()["items"]]

        assert names(name_prefix=p) == [c, churn, b, a]
        assert names(name_prefix=f"{p}-") == [b, a]
        # `_` is a literal in a prefix, not a LIKE wildcard that would match `-` too.
        assert names(name_prefix=f"{p}_") == [c]
        assert names(topic=topic) == [churn, b, a]
        assert names(topic=other_topic, name_prefix=p) == [c]
        assert names(limit=500)[:4] == [c, churn, b, a]

        first = client.get(URL, params={"limit": 3, "name_prefix": p}, headers=viewer_headers)
        assert [d["name"] for d in first.json()["items"]] == [c, churn, b]
        rest = client.get(
            URL,
            params={"limit": 3, "name_prefix": p, "cursor": first.json()["next_cursor"]},
            headers=viewer_headers,
        ).json()
        assert [d["name"] for d in rest["items"]] == [a]
        assert rest["next_cursor"] is None
        bad = client.get(URL, params={"name_prefix": "UPPER"}, headers=viewer_headers)
        assert bad.status_code == 422
    finally:
        TopicAdmin(stack_settings.kafka_bootstrap).delete_topics([other_topic])


def test_patch_changes_description_and_owner_and_is_audited(
    client: TestClient, editor_headers: dict[str, str], topic: str, db_session: Session
) -> None:
    client.post(URL, json=dataset_body("ds", topic), headers=editor_headers)

    response = client.patch(f"{URL}/ds", json={"owner": "ml-team"}, headers=editor_headers)
    assert response.status_code == 200
    assert response.json()["owner"] == "ml-team"
    assert response.json()["description"] == "card payments"
    response = client.patch(f"{URL}/ds", json={"topic": "elsewhere"}, headers=editor_headers)
    assert response.status_code == 422

    audit = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "dataset.update", AuditEvent.actor == "test-editor"
        )
    ).one()
    assert audit.before == {"description": "card payments", "owner": "risk-team"}
    assert audit.after == {"description": "card payments", "owner": "ml-team"}


def test_delete_removes_the_dataset_and_its_versions_unless_a_run_uses_one(
    client: TestClient, editor_headers: dict[str, str], topic: str, db_session: Session
) -> None:
    for name in ("keep", "drop"):
        client.post(URL, json=dataset_body(name, topic), headers=editor_headers)
        response = client.post(f"{URL}/{name}/versions", json={}, headers=editor_headers)
        assert response.status_code == 201, response.text
    used = client.get(f"{URL}/keep/versions/1", headers=editor_headers).json()
    db_session.add(
        TrainingRun(dataset_version_id=used["id"], algorithm="logistic", registered_model_name="m")
    )
    db_session.flush()

    response = client.delete(f"{URL}/keep", headers=editor_headers)
    assert response.status_code == 409
    assert response.json()["detail"] == (
        "dataset 'keep' cannot be deleted: 1 training run(s) use its versions"
    )

    response = client.delete(f"{URL}/drop", headers=editor_headers)
    assert response.status_code == 204
    assert client.get(f"{URL}/drop", headers=editor_headers).status_code == 404
    assert client.get(f"{URL}/drop/versions", headers=editor_headers).status_code == 404
    assert client.get(f"{URL}/keep/versions/1", headers=editor_headers).status_code == 200
    audit = db_session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "dataset.delete", AuditEvent.actor == "test-editor"
        )
    ).one()
    assert audit.resource_id == "drop"
    assert audit.before is not None
    assert audit.before["topic"] == topic


def test_kafka_unreachable_is_503(
    client: TestClient,
    editor_headers: dict[str, str],
    test_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    broken = test_settings.model_copy(update={"kafka_bootstrap": dead})
    client.app.dependency_overrides[get_settings] = lambda: broken  # type: ignore[attr-defined]
    monkeypatch.setattr(service, "KAFKA_TIMEOUT", 1.0)

    response = client.post(URL, json=dataset_body("ds", "payments"), headers=editor_headers)

    assert response.status_code == 503
    assert response.json()["detail"].startswith(f"Kafka at {dead} did not answer")
