"""Scorer status records reach the control plane: stored per instance, shown as deployment rollouts.

Real Kafka and Postgres throughout: records are produced to a unique status topic, consumed by the
real consumer thread (or the API process's own), and read back through the API and the CLI.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from carrara.deployments.status_consumer import StatusConsumer, apply_status_record
from carrara.models import ModelVersion, ScorerInstance
from carrara.registry import service as registry
from carrara.settings import Settings
from carrara.streams.client_config import admin_config, producer_config
from carrara.streams.scorer_status import DeploymentStatus, ScorerStatus, encode_status
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import run_cli, running_api

API = "/api/v1"
NOW = datetime.now(UTC)


def deployment_status(
    name: str, served: int | None, desired: int | None = None, state: str = "serving", **extra: Any
) -> DeploymentStatus:
    desired = desired if desired is not None else (served or 1)
    return DeploymentStatus(
        name=name,
        served_revision=served,
        desired_revision=desired,
        state=state,  # type: ignore[arg-type]
        **extra,
    )


def status(
    instance_id: str,
    *deployments: DeploymentStatus,
    pool: str = "default",
    updated_at: datetime | None = None,
    interval_s: float = 5.0,
    stopping: bool = False,
) -> ScorerStatus:
    return ScorerStatus(
        instance_id=instance_id,
        pool=pool,
        host=f"host-{instance_id}",
        started_at=NOW - timedelta(minutes=10),
        updated_at=updated_at or datetime.now(UTC),
        interval_s=interval_s,
        deployments=deployments,
        stopping=stopping,
    )


def apply(session: Session, record: ScorerStatus, seen_at: datetime | None = None) -> None:
    apply_status_record(
        session, record.instance_id.encode(), encode_status(record), seen_at=seen_at
    )
    session.flush()


def stored(session: Session, instance_id: str) -> ScorerInstance | None:
    session.expire_all()
    return session.get(ScorerInstance, instance_id)


def status_json(record: ScorerStatus, **changes: Any) -> bytes:
    """The JSON of `record` with fields replaced (to make malformed records)."""
    data = msgspec.to_builtins(record)
    data.update(changes)
    return orjson.dumps(data)


# --- apply_status_record --------------------------------------------------------------------


def test_a_record_is_upserted_by_instance_and_an_older_one_never_wins(db_session: Session) -> None:
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    apply(db_session, status("s1", deployment_status("fraud", 1), updated_at=t0))
    row = stored(db_session, "s1")
    assert row is not None
    assert (row.pool, row.host, row.interval_s, row.stopping) == ("default", "host-s1", 5.0, False)
    assert row.updated_at == t0
    assert row.deployments == [
        {
            "name": "fraud",
            "served_revision": 1,
            "desired_revision": 1,
            "state": "serving",
            "loaded_versions": [],
            "last_error": None,
            "events_scored": 0,
            "dead_letters": 0,
        }
    ]
    first_seen = row.seen_at

    newer = status(
        "s1",
        deployment_status("fraud", 2, loaded_versions=("fraud-model/2",), events_scored=10),
        updated_at=t0 + timedelta(seconds=5),
    )
    apply(db_session, newer)
    row = stored(db_session, "s1")
    assert row is not None
    assert row.deployments[0]["served_revision"] == 2
    assert row.deployments[0]["loaded_versions"] == ["fraud-model/2"]
    assert row.seen_at >= first_seen

    # A replay of an earlier record (another API process starting up) changes nothing.
    apply(db_session, status("s1", deployment_status("fraud", 1), updated_at=t0))
    row = stored(db_session, "s1")
    assert row is not None
    assert row.deployments[0]["served_revision"] == 2
    assert row.updated_at == t0 + timedelta(seconds=5)

    # Replaying the stored record with an older arrival time does not move seen_at back.
    latest_seen = row.seen_at
    apply(db_session, newer, seen_at=latest_seen - timedelta(hours=1))
    row = stored(db_session, "s1")
    assert row is not None
    assert row.seen_at == latest_seen


def test_stopping_marks_the_instance_and_a_tombstone_forgets_it(db_session: Session) -> None:
    apply(db_session, status("s-stop", deployment_status("fraud", 1)))
    apply(db_session, status("s-stop", deployment_status("fraud", 1), stopping=True))
    row = stored(db_session, "s-stop")
    assert row is not None
    assert row.stopping is True

    apply_status_record(db_session, b"s-stop", None)
    assert stored(db_session, "s-stop") is None
    # A tombstone of an instance never seen (or a non-UTF-8 key) is harmless.
    apply_status_record(db_session, b"never-seen", None)
    apply_status_record(db_session, b"\xff\xfe", None)


def test_a_record_without_utc_offset_is_read_as_utc(db_session: Session) -> None:
    record = status("s-naive", deployment_status("fraud", 1))
    raw = status_json(record, updated_at="2026-03-01T10:00:00", started_at="2026-03-01T09:00:00")
    apply_status_record(db_session, b"s-naive", raw)
    row = stored(db_session, "s-naive")
    assert row is not None
    assert row.updated_at == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


GOOD = status("s-bad", deployment_status("fraud", 1))
MALFORMED: dict[str, tuple[bytes, bytes]] = {
    "not json": (b"s-bad", b"{not json"),
    "empty object": (b"s-bad", b"{}"),
    "a list": (b"s-bad", b"[1, 2]"),
    "wrong type": (b"s-bad", status_json(GOOD, interval_s="often")),
    "unknown state": (
        b"s-bad",
        status_json(GOOD, deployments=[{**msgspec.to_builtins(GOOD.deployments[0]), "state": "x"}]),
    ),
    "bad date": (b"s-bad", status_json(GOOD, updated_at="yesterday")),
    "key is not the instance id": (b"someone-else", encode_status(GOOD)),
    "key not utf-8": (b"\xff\xfe", encode_status(GOOD)),
    "zero interval": (b"s-bad", status_json(GOOD, interval_s=0)),
    "huge interval": (b"s-bad", status_json(GOOD, interval_s=1e9)),
    "infinite interval": (b"s-bad", status_json(GOOD, interval_s=1e999)),
    "empty instance id": (b"", status_json(GOOD, instance_id="")),
    "long instance id": (b"x" * 201, status_json(GOOD, instance_id="x" * 201)),
    "long pool": (b"s-bad", status_json(GOOD, pool="p" * 101)),
    "NUL in host": (b"s-bad", status_json(GOOD, host="a\x00b")),
    "NUL in last error": (
        b"s-bad",
        status_json(
            GOOD,
            deployments=[{**msgspec.to_builtins(GOOD.deployments[0]), "last_error": "boom\x00"}],
        ),
    ),
    "future format": (b"s-bad", status_json(GOOD, format_version=2)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_record_is_skipped_and_later_records_still_apply(
    case: str, db_session: Session
) -> None:
    key, value = MALFORMED[case]
    apply_status_record(db_session, key, value)  # logs, never raises
    db_session.flush()
    ids = ["s-bad", "someone-else", "", "x" * 201]
    assert (
        db_session.scalar(select(ScorerInstance).where(ScorerInstance.instance_id.in_(ids))) is None
    )
    # The session is still usable: the next good record is stored.
    apply(db_session, status("s-good", deployment_status("fraud", 1)))
    assert stored(db_session, "s-good") is not None


def test_a_malformed_record_does_not_overwrite_a_good_one(db_session: Session) -> None:
    apply(db_session, GOOD)
    apply_status_record(db_session, b"s-bad", status_json(GOOD, pool="p" * 101))
    row = stored(db_session, "s-bad")
    assert row is not None
    assert row.pool == "default"


# --- rollout in the API ---------------------------------------------------------------------


def make_version(session: Session, model: str, version: int) -> ModelVersion:
    row = registry.register_version(
        session, model, version, None, f"models:/{model}/{version}", {"auc": 0.9}
    )
    session.flush()
    return row


@pytest.fixture
def io_topics(topic_name: str, stack_settings: Settings) -> Iterator[tuple[str, str]]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    names = (f"{topic_name}-in", f"{topic_name}-out")
    for name in names:
        admin.create_topic(name, 1)
    yield names
    admin.delete_topics(list(names))


def spec_body(topics: tuple[str, str], model: str, version: int) -> dict[str, Any]:
    return {
        "input_topic": topics[0],
        "output_topic": topics[1],
        "key_field": "user_id",
        "variants": [{"name": "a", "model": model, "version": version, "weight": 100}],
    }


def test_rollout_counts_live_scorers_of_the_pool_on_the_current_revision(
    client: TestClient,
    db_session: Session,
    editor_headers: dict[str, str],
    viewer_headers: dict[str, str],
    io_topics: tuple[str, str],
) -> None:
    make_version(db_session, "fraud-model", 1)
    make_version(db_session, "fraud-model", 2)
    put = client.put(
        f"{API}/deployments/fraud",
        json=spec_body(io_topics, "fraud-model", 1),
        headers=editor_headers,
    )
    assert put.status_code == 201, put.text

    empty = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert empty == {
        "desired_revision": 1,
        "scorers": [],
        "up_to_date": 0,
        "total": 0,
        "stalled": 0,
        "summary": "0/0 scorers on revision 1",
    }

    now = datetime.now(UTC)
    apply(db_session, status("s1", deployment_status("fraud", 1, events_scored=42)))
    apply(db_session, status("s2", deployment_status("fraud", 1), deployment_status("other", 3)))
    apply(
        db_session,
        status("s3", deployment_status("fraud", None, 1, "failed", last_error="no such model")),
    )
    # Liveness is per instance: 3 of its own intervals. s4 (60 s) was last heard 200 s ago: stale,
    # listed but not counted; s5 (60 s), heard 150 s ago, is still live.
    apply(
        db_session,
        status("s4", deployment_status("fraud", 1), interval_s=60),
        now - timedelta(seconds=200),
    )
    apply(
        db_session,
        status("s5", deployment_status("fraud", 1), interval_s=60),
        now - timedelta(seconds=150),
    )
    apply(db_session, status("s6", deployment_status("fraud", 1), stopping=True))
    apply(db_session, status("other-pool", deployment_status("fraud", 1), pool="gpu"))
    apply(db_session, status("not-running-it", deployment_status("other", 3)))

    rollout = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert rollout["summary"] == "3/4 scorers on revision 1"
    assert (rollout["up_to_date"], rollout["total"], rollout["desired_revision"]) == (3, 4, 1)
    by_id = {s["instance_id"]: s for s in rollout["scorers"]}
    assert sorted(by_id) == ["s1", "s2", "s3", "s4", "s5", "s6"]
    assert {i: s["live"] for i, s in by_id.items()} == {
        "s1": True,
        "s2": True,
        "s3": True,
        "s4": False,
        "s5": True,
        "s6": False,
    }
    assert by_id["s1"]["events_scored"] == 42
    assert by_id["s1"]["host"] == "host-s1"
    assert (by_id["s3"]["state"], by_id["s3"]["served_revision"]) == ("failed", None)
    assert by_id["s3"]["last_error"] == "no such model"

    # A new revision: nobody serves it until they report it.
    second = client.put(
        f"{API}/deployments/fraud",
        json=spec_body(io_topics, "fraud-model", 2),
        headers=editor_headers,
    )
    assert second.json()["revision"] == 2
    rollout = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert rollout["summary"] == "0/4 scorers on revision 2"
    apply(
        db_session, status("s1", deployment_status("fraud", 2, loaded_versions=("fraud-model/2",)))
    )
    apply(db_session, status("s2", deployment_status("fraud", 2)))
    apply(db_session, status("s3", deployment_status("fraud", 1, 2, "loading")))
    rollout = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert rollout["summary"] == "2/4 scorers on revision 2"

    # A stalled scoring loop (events waiting, no progress) is shown, and is not up to date.
    stuck = "no progress for 61 s with events waiting (last error: _ALL_BROKERS_DOWN)"
    apply(db_session, status("s2", deployment_status("fraud", 2, 2, "stalled", last_error=stuck)))
    rollout = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert rollout["summary"] == "1/4 scorers on revision 2, 1 stalled"
    assert rollout["stalled"] == 1
    by_id = {s["instance_id"]: s for s in rollout["scorers"]}
    assert (by_id["s2"]["state"], by_id["s2"]["last_error"]) == ("stalled", stuck)
    apply(db_session, status("s2", deployment_status("fraud", 2)))
    rollout = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert rollout["summary"] == "2/4 scorers on revision 2"

    # Stopped: done when the scorers of the pool it ran in say they stopped it.
    assert client.delete(f"{API}/deployments/fraud", headers=editor_headers).status_code == 200
    apply(db_session, status("s1", deployment_status("fraud", 2, 3, "stopped")))
    apply(db_session, status("s2", deployment_status("fraud", 2, 2, "serving")))
    rollout = client.get(f"{API}/deployments/fraud", headers=viewer_headers).json()["rollout"]
    assert rollout["desired_revision"] == 3
    assert rollout["summary"] == "1/4 scorers have stopped it (revision 3)"

    # The list endpoints are unchanged (no rollout there).
    listed = client.get(f"{API}/deployments", headers=viewer_headers).json()["items"]
    assert "rollout" not in listed[0]


def test_scorers_endpoint_lists_every_known_instance(
    client: TestClient, db_session: Session, viewer_headers: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    apply(db_session, status("b-1", deployment_status("fraud", 1), interval_s=2.0))
    apply(db_session, status("a-1", pool="gpu"), now - timedelta(hours=2))
    apply(db_session, status("b-2", stopping=True))

    response = client.get(f"{API}/scorers", headers=viewer_headers)
    assert response.status_code == 200, response.text
    # The session database is shared: scorers of other tests' API processes may report too.
    scorers = [s for s in response.json() if s["instance_id"] in {"a-1", "b-1", "b-2"}]
    assert [(s["pool"], s["instance_id"], s["live"]) for s in scorers] == [
        ("default", "b-1", True),
        ("default", "b-2", False),
        ("gpu", "a-1", False),
    ]
    assert scorers[0]["interval_s"] == 2.0
    assert scorers[0]["deployments"][0]["name"] == "fraud"
    assert scorers[1]["stopping"] is True

    gpu = client.get(f"{API}/scorers", params={"pool": "gpu"}, headers=viewer_headers).json()
    assert [s["instance_id"] for s in gpu] == ["a-1"]
    bad = client.get(f"{API}/scorers", params={"pool": "Not A Pool"}, headers=viewer_headers)
    assert bad.status_code == 422
    assert client.get(f"{API}/scorers").status_code == 401


# --- the consumer thread and the API process ------------------------------------------------


def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes, bytes | None]],
    timestamp: datetime | None = None,
) -> None:
    producer = Producer(producer_config(bootstrap))
    for key, value in records:
        kwargs: dict[str, Any] = {}
        if timestamp is not None:
            kwargs["timestamp"] = int(timestamp.timestamp() * 1000)
        producer.produce(topic, key=key, value=value, **kwargs)
    assert producer.flush(15) == 0


def record(item: ScorerStatus) -> tuple[bytes, bytes]:
    return item.instance_id.encode(), encode_status(item)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def prefix(engine: Engine) -> Iterator[str]:
    """A unique instance-id prefix; the rows committed under it are deleted afterwards."""
    value = f"t{uuid.uuid4().hex[:8]}-"
    yield value
    with Session(engine) as session, session.begin():
        session.execute(delete(ScorerInstance).where(ScorerInstance.instance_id.startswith(value)))


def committed_rows(engine: Engine, prefix: str) -> dict[str, ScorerInstance]:
    with Session(engine, expire_on_commit=False) as session:
        rows = session.scalars(
            select(ScorerInstance).where(ScorerInstance.instance_id.startswith(prefix))
        )
        return {r.instance_id.removeprefix(prefix): r for r in rows}


def test_consumer_thread_replays_the_topic_then_follows_it(
    client: TestClient,
    db_session: Session,
    engine: Engine,
    stack_settings: Settings,
    topic_name: str,
    prefix: str,
    editor_headers: dict[str, str],
    io_topics: tuple[str, str],
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).ensure_compacted_topic(topic_name, partitions=3)
    pool = f"pool-{prefix.rstrip('-')}"
    make_version(db_session, "fraud-model", 1)
    put = client.put(
        f"{API}/deployments/fraud",
        json={**spec_body(io_topics, "fraud-model", 1), "pool": pool},
        headers=editor_headers,
    )
    assert put.status_code == 201, put.text
    revision = put.json()["revision"]

    def scorer(name: str, served: int | None, state: str = "serving", **kw: Any) -> ScorerStatus:
        return status(
            prefix + name, deployment_status("fraud", served, revision, state), pool=pool, **kw
        )

    # Written before the consumer starts: replayed from the beginning of every partition.
    produce(
        bootstrap,
        topic_name,
        [
            record(scorer("a", revision)),
            (b"garbage", b"\x00not json"),
            record(scorer("b", revision)),
            record(scorer("c", None, "loading")),
            record(scorer("gone", revision)),
            ((prefix + "gone").encode(), None),
            ((prefix + "bad").encode(), status_json(scorer("bad", revision), interval_s=-1)),
        ],
    )
    # The last word of a scorer killed hours ago: replayed, it must not look live.
    produce(
        bootstrap,
        topic_name,
        [record(scorer("dead", revision))],
        timestamp=datetime.now(UTC) - timedelta(hours=2),
    )

    consumer = StatusConsumer(bootstrap, topic_name, sessionmaker(bind=engine))
    consumer.start()
    try:
        assert consumer.caught_up.wait(30), "the consumer never caught up with the topic"
        rows = committed_rows(engine, prefix)
        assert sorted(rows) == ["a", "b", "c", "dead"]
        assert datetime.now(UTC) - rows["dead"].seen_at > timedelta(hours=1)
        assert datetime.now(UTC) - rows["a"].seen_at < timedelta(minutes=1)

        # The API (another connection) sees what the consumer committed.
        rollout = client.get(f"{API}/deployments/fraud", headers=editor_headers).json()["rollout"]
        assert rollout["summary"] == f"2/3 scorers on revision {revision}"
        assert {s["instance_id"]: s["live"] for s in rollout["scorers"]}[prefix + "dead"] is False

        # Then it follows the topic: c catches up, b leaves cleanly.
        produce(
            bootstrap,
            topic_name,
            [
                record(scorer("c", revision)),
                record(scorer("b", revision, stopping=True)),
                ((prefix + "b").encode(), None),
            ],
        )
        wait_for(
            lambda: (
                "b" not in committed_rows(engine, prefix)
                and committed_rows(engine, prefix)["c"].deployments[0]["state"] == "serving"
            ),
            "c to serve and b to be forgotten",
        )
        rollout = client.get(f"{API}/deployments/fraud", headers=editor_headers).json()["rollout"]
        assert rollout["summary"] == f"2/2 scorers on revision {revision}"
    finally:
        started = time.monotonic()
        consumer.stop()
        assert time.monotonic() - started < 10


def test_the_api_process_consumes_status_and_the_cli_shows_the_rollout(
    test_database_url: str,
    engine: Engine,
    stack_settings: Settings,
    topic_name: str,
    prefix: str,
    io_topics: tuple[str, str],
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    status_topic = f"{topic_name}-status"
    deployments_topic = f"{topic_name}-deployments"
    model = f"status-model-{prefix.rstrip('-')}"
    name = f"status-{prefix.rstrip('-')}"
    with Session(engine) as session, session.begin():
        make_version(session, model, 1)
    admin = TopicAdmin(bootstrap)
    try:
        with running_api(
            test_database_url,
            "scorer-status",
            CARRARA_SCORER_STATUS_TOPIC=status_topic,
            CARRARA_DEPLOYMENTS_TOPIC=deployments_topic,
        ) as live:
            # The API made the status topic, compacted (its elected process does, once it has
            # won the election: wait for the topic to appear).
            deadline = time.monotonic() + 60
            while not admin.partitions(status_topic):
                assert time.monotonic() < deadline, "the API did not create the status topic"
                time.sleep(0.2)
            resource = ConfigResource(ConfigResource.Type.TOPIC, status_topic)
            kafka_admin = AdminClient(admin_config(bootstrap))  # keep it alive for the result
            configs = kafka_admin.describe_configs([resource])
            assert configs[resource].result(timeout=10)["cleanup.policy"].value == "compact"

            headers = {"Authorization": f"Bearer {live.admin_token}"}
            put = httpx.put(
                f"{live.url}{API}/deployments/{name}",
                json=spec_body(io_topics, model, 1),
                headers=headers,
                timeout=30,
            )
            assert put.status_code == 201, put.text
            produce(
                bootstrap,
                status_topic,
                [
                    record(status(prefix + "1", deployment_status(name, 1))),
                    record(status(prefix + "2", deployment_status(name, 1))),
                    record(status(prefix + "3", deployment_status(name, None, 1, "loading"))),
                    (b"junk", b"junk"),
                ],
            )

            def summary() -> str:
                detail = httpx.get(
                    f"{live.url}{API}/deployments/{name}", headers=headers, timeout=10
                )
                return str(detail.json()["rollout"]["summary"])

            wait_for(lambda: summary() == "2/3 scorers on revision 1", "the rollout in the API")
            shown = run_cli(live, "deployments", "show", name)
            assert shown.returncode == 0, shown.stderr
            assert "rollout: 2/3 scorers on revision 1" in shown.stdout
            assert prefix + "3" in shown.stdout

            as_json = run_cli(live, "deployments", "show", name, "--json")
            assert orjson.loads(as_json.stdout)["rollout"]["total"] == 3

            produce(bootstrap, status_topic, [((prefix + "3").encode(), None)])
            wait_for(lambda: summary() == "2/2 scorers on revision 1", "the tombstone applied")
    finally:
        admin.delete_topics([t for t in (status_topic, deployments_topic) if admin.partitions(t)])
