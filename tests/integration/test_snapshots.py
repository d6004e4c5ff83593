"""Dataset versions: offsets pinned from a real 3-partition topic with known events and times."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import AuditEvent
from carrara.settings import Settings
from carrara.streams.client_config import admin_config
from carrara.streams.topics import TopicAdmin

URL = "/api/v1/datasets"
# Recent, whole seconds: record timestamps older than the retention period would be deleted.
BASE_MS = (int(time.time()) - 600) * 1000
PER_PARTITION = 10


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def event_time(partition: int, i: int) -> int:
    """Partitions 0 and 1: one event a second from BASE_MS; partition 2: all before BASE_MS."""
    if partition == 2:
        return BASE_MS - 100_000 + i
    return BASE_MS + i * 1000


def produce(bootstrap: str, topic: str, partition: int, times: list[int]) -> None:
    # A plain producer: the idempotent one costs half a second to start, per call.
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, ts in enumerate(times):
        value = orjson.dumps({"user": f"u{i}", "amount": float(i), "label": i % 2 == 0})
        producer.produce(topic, value=value, partition=partition, timestamp=ts)
    assert producer.flush(30) == 0


@pytest.fixture
def dataset(
    client: TestClient, editor_headers: dict[str, str], stack_settings: Settings, topic_name: str
) -> str:
    """Dataset 'clicks' on a 3-partition topic holding 10 events per partition."""
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    for p in range(3):
        produce(bootstrap, topic_name, p, [event_time(p, i) for i in range(PER_PARTITION)])
    body = {
        "name": "clicks",
        "topic": topic_name,
        "key_field": "user",
        "features": [{"name": "amount", "type": "float"}],
        "label_field": "label",
        "task": "binary",
    }
    response = client.post(URL, json=body, headers=editor_headers)
    assert response.status_code == 201, response.text
    return "clicks"


def snapshot(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> Any:
    return client.post(f"{URL}/clicks/versions", json=body, headers=headers)


def ranges(version: dict[str, Any]) -> list[tuple[int, int, int]]:
    return [(o["partition"], o["start"], o["end"]) for o in version["offsets"]]


def test_latest_pins_everything_up_to_now_and_versions_count_up(
    client: TestClient,
    editor_headers: dict[str, str],
    viewer_headers: dict[str, str],
    stack_settings: Settings,
    topic_name: str,
    dataset: str,
    db_session: Session,
) -> None:
    response = snapshot(client, editor_headers, {"description": "first"})
    assert response.status_code == 201, response.text
    v1 = response.json()
    assert v1["number"] == 1
    assert v1["dataset"] == "clicks"
    assert v1["mode"] == "latest"
    assert v1["selector"] == {}
    assert ranges(v1) == [(0, 0, 10), (1, 0, 10), (2, 0, 10)]
    assert v1["event_count"] == 30
    assert v1["description"] == "first"
    assert v1["created_by"] == "test-editor"

    produce(stack_settings.kafka_bootstrap, topic_name, 1, [BASE_MS + 20_000] * 5)
    v2 = snapshot(client, editor_headers, {"mode": "latest"}).json()
    assert v2["number"] == 2
    assert ranges(v2) == [(0, 0, 10), (1, 0, 15), (2, 0, 10)]
    assert v2["event_count"] == 35

    listed = client.get(f"{URL}/clicks/versions", headers=viewer_headers).json()
    assert [v["number"] for v in listed["items"]] == [2, 1]
    page = client.get(f"{URL}/clicks/versions", params={"limit": 1}, headers=viewer_headers)
    assert [v["number"] for v in page.json()["items"]] == [2]
    rest = client.get(
        f"{URL}/clicks/versions",
        params={"limit": 1, "cursor": page.json()["next_cursor"]},
        headers=viewer_headers,
    ).json()
    assert [v["number"] for v in rest["items"]] == [1]
    # A version never changes: the first one still pins the first 30 events.
    assert client.get(f"{URL}/clicks/versions/1", headers=viewer_headers).json() == v1

    audits = db_session.scalars(
        select(AuditEvent)
        .where(AuditEvent.action == "dataset.version.create", AuditEvent.actor == "test-editor")
        .order_by(AuditEvent.id)
    ).all()
    assert [a.resource_id for a in audits] == ["clicks/v1", "clicks/v2"]
    assert audits[1].after is not None
    assert audits[1].after["event_count"] == 35


def test_a_time_range_is_resolved_with_offsets_for_times(
    client: TestClient, editor_headers: dict[str, str], dataset: str
) -> None:
    body = {"mode": "time_range", "from": iso(BASE_MS + 3000), "to": iso(BASE_MS + 7000)}
    response = snapshot(client, editor_headers, body)
    assert response.status_code == 201, response.text
    version = response.json()
    # `to` is exclusive; partition 2 has no event in the range, so start = end.
    assert ranges(version) == [(0, 3, 7), (1, 3, 7), (2, 10, 10)]
    assert version["event_count"] == 8
    assert version["mode"] == "time_range"
    assert version["selector"] == {"from": iso(BASE_MS + 3000), "to": iso(BASE_MS + 7000)}


def test_an_open_ended_time_range(
    client: TestClient, editor_headers: dict[str, str], dataset: str
) -> None:
    until = snapshot(client, editor_headers, {"mode": "time_range", "to": iso(BASE_MS + 5000)})
    assert ranges(until.json()) == [(0, 0, 5), (1, 0, 5), (2, 0, 10)]
    assert until.json()["event_count"] == 20

    # Naive datetimes are UTC.
    since = iso(BASE_MS + 8000).removesuffix("+00:00")
    after = snapshot(client, editor_headers, {"mode": "time_range", "from": since})
    assert ranges(after.json()) == [(0, 8, 10), (1, 8, 10), (2, 10, 10)]
    assert after.json()["event_count"] == 4
    assert after.json()["number"] == 2


def test_explicit_offsets_are_stored_as_given(
    client: TestClient, editor_headers: dict[str, str], dataset: str
) -> None:
    offsets = [
        {"partition": 2, "start": 10, "end": 10},
        {"partition": 0, "start": 2, "end": 5},
        {"partition": 1, "start": 0, "end": 10},
    ]
    response = snapshot(client, editor_headers, {"mode": "explicit", "offsets": offsets})
    assert response.status_code == 201, response.text
    version = response.json()
    assert ranges(version) == [(0, 2, 5), (1, 0, 10), (2, 10, 10)]
    assert version["event_count"] == 13
    assert version["selector"] == {"offsets": offsets}


@pytest.mark.parametrize(
    ("offsets", "errors"),
    [
        (
            [(0, 0, 11), (1, 0, 10), (2, 0, 10)],
            [(0, "end 11 is past the high watermark 10 (records not written yet)")],
        ),
        (
            [(0, 0, 10), (1, 0, 10)],
            [
                (
                    2,
                    "partition 2 is missing: give every partition a range (start = end for none; "
                    "retained offsets are 0..10)",
                )
            ],
        ),
        (
            [(0, 0, 10), (0, 0, 10), (1, 0, 10), (2, 0, 10)],
            [(0, "partition 0 is given more than once")],
        ),
        (
            [(0, 0, 10), (1, 0, 10), (2, 0, 10), (3, 0, 1)],
            [(3, "partition 3 does not exist (the topic has partitions 0..2)")],
        ),
        ([(0, 6, 5), (1, 0, 10), (2, 0, 10)], [(0, "start 6 is after end 5")]),
    ],
)
def test_explicit_offsets_that_do_not_fit_the_topic_are_422(
    client: TestClient,
    editor_headers: dict[str, str],
    dataset: str,
    offsets: list[tuple[int, int, int]],
    errors: list[tuple[int, str]],
) -> None:
    body = {
        "mode": "explicit",
        "offsets": [{"partition": p, "start": s, "end": e} for p, s, e in offsets],
    }
    response = snapshot(client, editor_headers, body)
    assert response.status_code == 422
    problem = response.json()
    assert [(e["partition"], e["message"]) for e in problem["errors"]] == errors
    assert problem["detail"].startswith("the offsets do not fit topic")
    listed = client.get(f"{URL}/clicks/versions", headers=editor_headers).json()
    assert listed["items"] == []


def test_the_low_watermark_bounds_snapshots_after_retention_deleted_records(
    client: TestClient,
    editor_headers: dict[str, str],
    stack_settings: Settings,
    topic_name: str,
    dataset: str,
) -> None:
    admin = AdminClient(admin_config(stack_settings.kafka_bootstrap))
    futures = admin.delete_records([TopicPartition(topic_name, 0, 4)])
    for future in futures.values():
        future.result(timeout=30)

    latest = snapshot(client, editor_headers, {}).json()
    assert ranges(latest) == [(0, 4, 10), (1, 0, 10), (2, 0, 10)]
    assert latest["event_count"] == 26

    body = {
        "mode": "explicit",
        "offsets": [
            {"partition": 0, "start": 2, "end": 10},
            {"partition": 1, "start": 0, "end": 10},
            {"partition": 2, "start": 0, "end": 10},
        ],
    }
    response = snapshot(client, editor_headers, body)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {
            "partition": 0,
            "message": "start 2 is before the low watermark 4 "
            "(older records are no longer retained)",
        }
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"mode": "time_range", "from": iso(BASE_MS + 5000), "to": iso(BASE_MS + 5000)},
            "`from` must be before `to`",
        ),
        ({"mode": "time_range"}, "mode time_range needs `from`, `to` or both"),
        ({"mode": "time_range", "to": "1969-12-31T23:59:59Z"}, "must not be before 1970"),
        ({"mode": "time_range", "to": "not a time"}, "to: Input should be a valid datetime"),
        ({"mode": "latest", "from": iso(BASE_MS)}, "`from`/`to` apply to mode time_range"),
        (
            {"mode": "latest", "offsets": [{"partition": 0, "start": 0, "end": 1}]},
            "`offsets` apply to mode explicit",
        ),
        ({"mode": "explicit"}, "mode explicit needs `offsets`"),
        (
            {"mode": "explicit", "offsets": [{"partition": 0, "start": -1, "end": 1}]},
            "offsets.0.start: Input should be greater than or equal to 0",
        ),
        (
            {"mode": "explicit", "offsets": [{"partition": 0, "start": 0, "end": 2**63}]},
            "offsets.0.end: Input should be less than or equal to",
        ),
        ({"mode": "everything"}, "mode: Input should be"),
    ],
)
def test_invalid_snapshot_requests_are_422(
    client: TestClient,
    editor_headers: dict[str, str],
    dataset: str,
    body: dict[str, Any],
    message: str,
) -> None:
    response = snapshot(client, editor_headers, body)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_versions_are_immutable_and_need_the_editor_role_to_create(
    client: TestClient,
    editor_headers: dict[str, str],
    viewer_headers: dict[str, str],
    dataset: str,
) -> None:
    assert snapshot(client, viewer_headers, {}).status_code == 403
    assert snapshot(client, {}, {}).status_code == 401
    assert snapshot(client, editor_headers, {}).status_code == 201
    path = f"{URL}/clicks/versions/1"
    for method in ("PUT", "PATCH", "DELETE"):
        response = client.request(method, path, json={}, headers=editor_headers)
        assert response.status_code == 405, method
    assert client.get(path, headers=viewer_headers).status_code == 200
    missing = client.get(f"{URL}/clicks/versions/2", headers=viewer_headers)
    assert missing.status_code == 404
    assert missing.json()["detail"] == "dataset 'clicks' has no version 2"
    too_big = client.get(f"{URL}/clicks/versions/{2**31}", headers=viewer_headers)
    assert too_big.status_code == 422


def test_a_snapshot_of_a_deleted_topic_is_409(
    client: TestClient,
    editor_headers: dict[str, str],
    stack_settings: Settings,
    topic_name: str,
    dataset: str,
) -> None:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    admin.delete_topics([topic_name])
    deadline = time.monotonic() + 30
    while admin.partitions(topic_name) and time.monotonic() < deadline:
        time.sleep(0.1)

    response = snapshot(client, editor_headers, {})
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"topic '{topic_name}' of dataset 'clicks' no longer exists in Kafka"
    )
