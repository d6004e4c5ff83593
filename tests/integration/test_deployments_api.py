"""Declarative deployments over the real API, Postgres and Kafka: revisions, rollback, stop."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import ModelAlias, ModelVersion, OutboxMessage
from carrara.registry import service as registry
from carrara.settings import Settings, get_settings
from carrara.streams.deployment_spec import spec_from_dict

API = "/api/v1/deployments"


def make_version(session: Session, model: str, version: int) -> ModelVersion:
    """A model version as the training worker registers it (no MLflow needed here)."""
    row = registry.register_version(
        session, model, version, None, f"models:/{model}/{version}", {"auc": 0.9}
    )
    session.flush()
    return row


def point_alias(session: Session, row: ModelVersion, alias: str) -> None:
    existing = session.get(ModelAlias, (row.registered_model_id, alias))
    if existing is None:
        session.add(
            ModelAlias(registered_model_id=row.registered_model_id, alias=alias, model_version=row)
        )
    else:
        existing.model_version = row
    session.flush()


@pytest.fixture
def models(db_session: Session) -> dict[str, ModelVersion]:
    return {
        "v1": make_version(db_session, "fraud-model", 1),
        "v2": make_version(db_session, "fraud-model", 2),
        "gbm1": make_version(db_session, "fraud-gbm", 1),
    }


def body(io_topics: tuple[str, str], **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input_topic": io_topics[0],
        "output_topic": io_topics[1],
        "key_field": "user_id",
        "variants": [
            {"name": "a", "model": "fraud-model", "version": 1, "weight": 90},
            {"name": "b", "model": "fraud-model", "version": 2, "weight": 10},
        ],
    }
    spec.update(overrides)
    return spec


def outbox_rows(session: Session, name: str) -> list[OutboxMessage]:
    return list(
        session.scalars(
            select(OutboxMessage).where(OutboxMessage.key == name).order_by(OutboxMessage.id)
        )
    )


@pytest.mark.usefixtures("models")
def test_put_stores_a_revision_only_when_the_spec_changes(
    client: TestClient,
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    db_session: Session,
    test_settings: Settings,
) -> None:
    first = client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers)
    assert first.status_code == 201, first.text
    created = first.json()
    assert created["changed"] is True
    assert created["revision"] == 1
    assert created["status"] == "running"
    assert created["spec"]["pool"] == "default"
    assert [v["name"] for v in created["spec"]["variants"]] == ["a", "b"]

    again = client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers)
    assert again.status_code == 200
    assert again.json()["changed"] is False
    assert again.json()["revision"] == 1

    # Variant order is not part of the desired state.
    reordered = body(io_topics)
    reordered["variants"].reverse()
    same = client.put(f"{API}/fraud", json=reordered, headers=editor_headers)
    assert (same.status_code, same.json()["revision"]) == (200, 1)

    shifted = body(io_topics, reason="ramp b up")
    shifted["variants"][0]["weight"], shifted["variants"][1]["weight"] = 50, 50
    second = client.put(f"{API}/fraud", json=shifted, headers=editor_headers)
    assert second.status_code == 201
    assert second.json()["revision"] == 2
    assert second.json()["salt"] == created["salt"]  # entities keep their bucket

    current = client.get(f"{API}/fraud", headers=editor_headers).json()
    assert current["revision"] == 2
    assert [v["weight"] for v in current["spec"]["variants"]] == [50, 50]

    history = client.get(f"{API}/fraud/revisions", headers=editor_headers).json()["items"]
    assert [r["number"] for r in history] == [2, 1]
    assert history[0]["reason"] == "ramp b up"
    assert history[0]["created_by"] == "test-editor"
    assert history[0]["spec_hash"] != history[1]["spec_hash"]

    # One outbox message per new revision, none for the unchanged PUTs.
    messages = outbox_rows(db_session, "fraud")
    assert [m.destination for m in messages] == [test_settings.deployments_topic] * 2
    wire = [spec_from_dict(m.payload or {}) for m in messages]
    assert [w.revision for w in wire] == [1, 2]
    assert wire[1].salt == created["salt"]
    assert [(v.name, v.model_name, v.model_version, v.weight) for v in wire[1].variants] == [
        ("a", "fraud-model", 1, 50),
        ("b", "fraud-model", 2, 50),
    ]


def test_an_alias_is_resolved_to_a_version_when_applied(
    client: TestClient,
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    db_session: Session,
    models: dict[str, ModelVersion],
) -> None:
    point_alias(db_session, models["v1"], "champion")
    spec = body(
        io_topics,
        variants=[
            {"name": "main", "model": "fraud-model", "alias": "champion", "weight": 100},
            {
                "name": "shadow",
                "model": "fraud-gbm",
                "version": 1,
                "shadow": True,
                "shadow_sample_pct": 20,
            },
        ],
    )
    first = client.put(f"{API}/fraud", json=spec, headers=editor_headers)
    assert first.status_code == 201, first.text
    variants = {v["name"]: v for v in first.json()["spec"]["variants"]}
    assert variants["main"]["version"] == 1
    assert variants["shadow"] == {
        "name": "shadow",
        "model": "fraud-gbm",
        "version": 1,
        "weight": 0,
        "shadow": True,
        "shadow_sample_pct": 20.0,
    }
    # The same file after the alias moved is a different desired state.
    point_alias(db_session, models["v2"], "champion")
    moved = client.put(f"{API}/fraud", json=spec, headers=editor_headers)
    assert moved.status_code == 201
    assert {v["name"]: v["version"] for v in moved.json()["spec"]["variants"]}["main"] == 2


def _variant(name: str, weight: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "fraud-model", "version": 1, "weight": weight, **extra}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"variants": [_variant("a", 60), _variant("b", 30)]}, "sum to 100, got 90"),
        ({"variants": [_variant("a", 50), _variant("a", 50)]}, "repeated: a"),
        ({"variants": []}, "at least 1"),
        ({"variants": [_variant(f"v{i}", 10 if i < 10 else 0) for i in range(11)]}, "at most 10"),
        (
            {"variants": [_variant("a", 100), _variant("s", 5, shadow=True)]},
            "weight must be 0",
        ),
        ({"variants": [_variant("s", 0, shadow=True)]}, "at least one variant must be live"),
        ({"variants": [_variant("a", 100, alias="champion")]}, "exactly one of"),
        ({"variants": [_variant("a", 100, shadow_sample_pct=5)]}, "for shadow variants"),
        ({"variants": [_variant("a", 101)]}, "less than or equal to 100"),
        ({"variants": [_variant("a", 100, version=2**31)]}, "less than or equal to"),
        ({"variants": [_variant("A B", 100)]}, "variants.0.name"),
        ({"output_topic": "SAME", "input_topic": "SAME"}, "must differ"),
        ({"input_topic": "bad topic!"}, "input_topic"),
        ({"pool": "Not A Slug"}, "pool"),
        ({"weigth": 3}, "weigth"),
        ({"key_field": ""}, "key_field"),
    ],
)
def test_invalid_specs_are_refused_with_a_precise_422(
    client: TestClient,
    editor_headers: dict[str, str],
    change: dict[str, Any],
    message: str,
) -> None:
    spec = body(("in", "out"), **copy.deepcopy(change))
    response = client.put(f"{API}/fraud", json=spec, headers=editor_headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert message in response.json()["detail"]


@pytest.mark.usefixtures("models")
def test_missing_versions_aliases_and_topics_are_named(
    client: TestClient, editor_headers: dict[str, str], io_topics: tuple[str, str]
) -> None:
    missing_version = body(io_topics, variants=[_variant("a", 100, version=7)])
    response = client.put(f"{API}/fraud", json=missing_version, headers=editor_headers)
    assert response.status_code == 422
    assert (
        response.json()["detail"] == "variant 'a': model 'fraud-model' has no version 7 in Carrara"
    )

    unknown_model = body(io_topics, variants=[_variant("a", 100, model="nope")])
    response = client.put(f"{API}/fraud", json=unknown_model, headers=editor_headers)
    assert response.status_code == 422
    assert "model 'nope' is not registered" in response.json()["detail"]

    no_alias = body(
        io_topics,
        variants=[{"name": "a", "model": "fraud-model", "alias": "champion", "weight": 100}],
    )
    response = client.put(f"{API}/fraud", json=no_alias, headers=editor_headers)
    assert response.status_code == 422
    assert "has no alias 'champion'" in response.json()["detail"]

    missing_topic = body(io_topics, output_topic=f"{io_topics[1]}-missing")
    response = client.put(f"{API}/fraud", json=missing_topic, headers=editor_headers)
    assert response.status_code == 422
    assert response.json()["missing"] == [f"{io_topics[1]}-missing"]
    assert f"{io_topics[1]}-missing" in response.json()["detail"]

    assert client.get(f"{API}/fraud", headers=editor_headers).status_code == 404


@pytest.mark.usefixtures("models")
def test_kafka_unreachable_gives_503_and_stores_nothing(
    client: TestClient,
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    test_settings: Settings,
) -> None:
    down = test_settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    client.app.dependency_overrides[get_settings] = lambda: down  # type: ignore[attr-defined]
    response = client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers)
    assert response.status_code == 503
    assert "Kafka" in response.json()["detail"]
    assert client.get(f"{API}/fraud", headers=editor_headers).status_code == 404


@pytest.mark.usefixtures("models")
def test_roles_and_tokens_are_enforced(
    client: TestClient,
    editor_headers: dict[str, str],
    viewer_headers: dict[str, str],
    io_topics: tuple[str, str],
) -> None:
    assert client.put(f"{API}/fraud", json=body(io_topics)).status_code == 401
    refused = client.put(f"{API}/fraud", json=body(io_topics), headers=viewer_headers)
    assert refused.status_code == 403
    assert "editor" in refused.json()["detail"]
    assert (
        client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers).status_code == 201
    )
    assert client.get(f"{API}/fraud", headers=viewer_headers).status_code == 200
    assert client.get(API).status_code == 401
    for method, path, kwargs in (
        ("POST", f"{API}/fraud/rollback", {"json": {"revision": 1}}),
        ("DELETE", f"{API}/fraud", {}),
    ):
        assert client.request(method, path, headers=viewer_headers, **kwargs).status_code == 403


@pytest.mark.usefixtures("models")
def test_rollback_makes_a_new_revision_with_an_old_spec(
    client: TestClient, editor_headers: dict[str, str], io_topics: tuple[str, str]
) -> None:
    client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers)
    changed = body(io_topics, variants=[_variant("a", 100, version=2)])
    client.put(f"{API}/fraud", json=changed, headers=editor_headers)

    rolled = client.post(
        f"{API}/fraud/rollback", json={"revision": 1, "reason": "b hurts"}, headers=editor_headers
    )
    assert rolled.status_code == 201, rolled.text
    assert rolled.json()["revision"] == 3
    history = client.get(f"{API}/fraud/revisions", headers=editor_headers).json()["items"]
    assert history[0]["spec"] == history[2]["spec"]
    assert history[0]["reason"] == "rollback to revision 1: b hurts"

    again = client.post(f"{API}/fraud/rollback", json={"revision": 1}, headers=editor_headers)
    assert again.status_code == 409
    assert "already runs the spec of revision 1" in again.json()["detail"]
    unknown = client.post(f"{API}/fraud/rollback", json={"revision": 9}, headers=editor_headers)
    assert unknown.status_code == 404
    assert "no revision 9" in unknown.json()["detail"]
    nobody = client.post(f"{API}/ghost/rollback", json={"revision": 1}, headers=editor_headers)
    assert nobody.status_code == 404
    bad = client.post(f"{API}/fraud/rollback", json={"revision": 0}, headers=editor_headers)
    assert bad.status_code == 422


@pytest.mark.usefixtures("models")
def test_delete_stops_and_a_later_put_or_rollback_starts_again(
    client: TestClient,
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
    db_session: Session,
) -> None:
    client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers)
    stopped = client.delete(f"{API}/fraud", params={"reason": "incident"}, headers=editor_headers)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    assert stopped.json()["revision"] == 2
    assert stopped.json()["spec"] is None
    assert stopped.json()["stopped_at"] is not None
    again = client.delete(f"{API}/fraud", headers=editor_headers)
    assert again.status_code == 409
    assert "already stopped" in again.json()["detail"]

    history = client.get(f"{API}/fraud/revisions", headers=editor_headers).json()["items"]
    assert (history[0]["stopped"], history[0]["spec"], history[0]["reason"]) == (
        True,
        None,
        "incident",
    )
    stop_record = spec_from_dict(outbox_rows(db_session, "fraud")[-1].payload or {})
    assert (stop_record.stopped, stop_record.revision, stop_record.variants) == (True, 2, ())

    refused = client.post(f"{API}/fraud/rollback", json={"revision": 2}, headers=editor_headers)
    assert refused.status_code == 422
    assert "is a stop" in refused.json()["detail"]

    # The same body as before the stop starts it again, as a new revision.
    restarted = client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers)
    assert restarted.status_code == 201
    assert (restarted.json()["revision"], restarted.json()["status"]) == (3, "running")
    assert restarted.json()["stopped_at"] is None

    client.delete(f"{API}/fraud", headers=editor_headers)
    revived = client.post(f"{API}/fraud/rollback", json={"revision": 1}, headers=editor_headers)
    assert revived.status_code == 201
    assert (revived.json()["revision"], revived.json()["status"]) == (5, "running")
    assert client.delete(f"{API}/ghost", headers=editor_headers).status_code == 404


@pytest.mark.usefixtures("models")
def test_every_change_is_audited_with_before_and_after(
    client: TestClient, editor_headers: dict[str, str], io_topics: tuple[str, str]
) -> None:
    first = client.put(f"{API}/fraud", json=body(io_topics), headers=editor_headers).json()
    second = body(io_topics, variants=[_variant("a", 100, version=2)])
    second_spec = client.put(f"{API}/fraud", json=second, headers=editor_headers).json()["spec"]
    client.delete(f"{API}/fraud", headers=editor_headers)
    events = client.get(
        "/api/v1/audit",
        params={"resource_type": "deployment", "resource_id": "fraud"},
        headers=editor_headers,
    ).json()["items"]
    assert [e["action"] for e in events] == [
        "deployment.stop",
        "deployment.apply",
        "deployment.apply",
    ]
    stop, change, create = events

    def stored(spec: dict[str, object]) -> dict[str, object]:
        # The audit has the stored spec, which leaves out the default output format and
        # include_features (so older specs keep their hash); the API shows them.
        assert spec.pop("output_format") == "json"
        assert spec.pop("include_features") is False
        return spec

    first_spec, second_spec = stored(first["spec"]), stored(second_spec)
    assert (create["before"], create["after"]) == (None, first_spec)
    assert (change["before"], change["after"]) == (first_spec, second_spec)
    assert (stop["before"], stop["after"]) == (second_spec, None)
    assert all(e["actor"] == "test-editor" for e in events)
    assert change["detail"] == "revision 2"


@pytest.mark.usefixtures("models")
def test_list_filters_by_status_and_name_and_paginates(
    client: TestClient,
    viewer_headers: dict[str, str],
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
) -> None:
    for name in ("list-a", "list-b", "list-c"):
        assert client.put(f"{API}/{name}", json=body(io_topics), headers=editor_headers).is_success
    client.delete(f"{API}/list-b", headers=editor_headers)

    page = client.get(API, params={"name": "list-", "limit": 2}, headers=viewer_headers).json()
    assert [d["name"] for d in page["items"]] == ["list-c", "list-b"]
    rest = client.get(
        API,
        params={"name": "list-", "limit": 2, "cursor": page["next_cursor"]},
        headers=viewer_headers,
    ).json()
    assert [d["name"] for d in rest["items"]] == ["list-a"]
    assert rest["next_cursor"] is None

    running = client.get(API, params={"name": "list-", "status": "running"}, headers=viewer_headers)
    assert [d["name"] for d in running.json()["items"]] == ["list-c", "list-a"]
    stopped = client.get(API, params={"name": "list-", "status": "stopped"}, headers=viewer_headers)
    assert [d["name"] for d in stopped.json()["items"]] == ["list-b"]
    assert client.get(API, params={"status": "paused"}, headers=viewer_headers).status_code == 422
    assert client.get(f"{API}/Bad_Name", headers=viewer_headers).status_code == 422
