"""Deployment revisions reach the compacted deployments topic through the outbox, outage or not."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from carrara.models import OutboxMessage
from carrara.outbox.relay import OutboxRelay
from carrara.registry import service as registry
from carrara.settings import Settings, get_settings
from carrara.streams.client_config import consumer_config
from carrara.streams.deployment_spec import DeploymentSpec, decode_spec
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import LiveApi, run_cli


@pytest.fixture
def deployments_topic(
    client: TestClient, topic_name: str, stack_settings: Settings, test_settings: Settings
) -> str:
    """A compacted deployments topic unique to the test, which the app publishes to."""
    TopicAdmin(stack_settings.kafka_bootstrap).ensure_compacted_topic(topic_name)
    settings = test_settings.model_copy(update={"deployments_topic": topic_name})
    client.app.dependency_overrides[get_settings] = lambda: settings  # type: ignore[attr-defined]
    return topic_name


def spec_body(topics: tuple[str, str], model: str, version: int) -> dict[str, object]:
    return {
        "input_topic": topics[0],
        "output_topic": topics[1],
        "key_field": "user_id",
        "variants": [{"name": "a", "model": model, "version": version, "weight": 100}],
    }


def read_topic(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    start: int = OFFSET_BEGINNING,
    timeout: float = 30,
    key: str | None = None,
) -> list[tuple[str, DeploymentSpec]]:
    """The first `count` records (with `key`, if given) of partition 0 from `start`, decoded."""
    consumer = Consumer(consumer_config(bootstrap, f"test-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic, 0, start)])
    records: list[tuple[str, DeploymentSpec]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            raw_key, value = message.key(), message.value()
            assert raw_key is not None
            assert value is not None
            if key is None or raw_key.decode() == key:
                records.append((raw_key.decode(), decode_spec(value)))
    finally:
        consumer.close()
    return records


def pending(session: Session, topic: str) -> list[OutboxMessage]:
    return list(
        session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.destination == topic)
            .order_by(OutboxMessage.id)
        )
    )


def test_a_revision_waits_out_a_kafka_outage_then_is_published(
    client: TestClient,
    editor_headers: dict[str, str],
    db_session: Session,
    stack_settings: Settings,
    deployments_topic: str,
    io_topics: tuple[str, str],
) -> None:
    registry.register_version(db_session, "outbox-model", 1, None, "models:/m-1", {})
    put = client.put(
        "/api/v1/deployments/outbox-a",
        json=spec_body(io_topics, "outbox-model", 1),
        headers=editor_headers,
    )
    assert put.status_code == 201, put.text

    delivered = OutboxRelay("127.0.0.1:1", delivery_timeout_ms=2000).run_once(db_session)
    assert delivered == 0
    [message] = pending(db_session, deployments_topic)
    assert message.published_at is None
    assert message.attempts == 1
    assert message.last_error
    assert message.key == "outbox-a"

    OutboxRelay(stack_settings.kafka_bootstrap).run_once(db_session)
    assert message.published_at is not None
    [(key, spec)] = read_topic(stack_settings.kafka_bootstrap, deployments_topic, 1)
    assert key == "outbox-a"
    assert (spec.name, spec.revision, spec.stopped) == ("outbox-a", 1, False)
    assert spec.salt == put.json()["salt"]
    assert (spec.input_topic, spec.output_topic, spec.key_field, spec.pool) == (
        *io_topics,
        "user_id",
        "default",
    )
    [variant] = spec.variants
    assert (variant.model_name, variant.model_version, variant.weight) == ("outbox-model", 1, 100)


def test_revisions_of_one_deployment_arrive_in_order_after_a_failure(
    client: TestClient,
    editor_headers: dict[str, str],
    db_session: Session,
    stack_settings: Settings,
    deployments_topic: str,
    io_topics: tuple[str, str],
) -> None:
    for version in (1, 2):
        registry.register_version(db_session, "outbox-model", version, None, "models:/m", {})
    url = "/api/v1/deployments/outbox-b"
    first_put = client.put(
        url, json=spec_body(io_topics, "outbox-model", 1), headers=editor_headers
    )
    assert first_put.status_code == 201
    OutboxRelay("127.0.0.1:1", delivery_timeout_ms=2000).run_once(db_session)
    second_put = client.put(
        url, json=spec_body(io_topics, "outbox-model", 2), headers=editor_headers
    )
    assert second_put.status_code == 201
    assert client.delete(url, headers=editor_headers).status_code == 200
    first, second, third = pending(db_session, deployments_topic)
    assert (first.attempts, second.attempts, third.attempts) == (1, 0, 0)

    assert OutboxRelay(stack_settings.kafka_bootstrap).run_once(db_session) >= 3
    records = read_topic(stack_settings.kafka_bootstrap, deployments_topic, 3)
    assert [key for key, _ in records] == ["outbox-b"] * 3
    assert [(s.revision, s.stopped) for _, s in records] == [(1, False), (2, False), (3, True)]
    assert [v.model_version for v in records[1][1].variants] == [2]


def test_ensure_compacted_topic_creates_or_fixes_the_cleanup_policy(
    stack_settings: Settings, topic_name: str
) -> None:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)

    def policy(name: str) -> str:
        raw = AdminClient({"bootstrap.servers": stack_settings.kafka_bootstrap})
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        return str(raw.describe_configs([resource])[resource].result()["cleanup.policy"].value)

    assert admin.ensure_compacted_topic(topic_name) is True
    assert policy(topic_name) == "compact"
    assert admin.ensure_compacted_topic(topic_name) is False

    plain = f"{topic_name}-plain"
    admin.create_topic(plain, 1)
    try:
        assert policy(plain) == "delete"
        assert admin.ensure_compacted_topic(plain) is True
        assert policy(plain) == "compact"
    finally:
        admin.delete_topics([plain])


def test_live_api_publishes_a_cli_deploy_to_the_deployments_topic(
    live_api: LiveApi,
    engine: Engine,
    stack_settings: Settings,
    io_topics: tuple[str, str],
    tmp_path: Path,
) -> None:
    # The live API's lifespan made the default topic, compacted.
    topic = Settings().deployments_topic
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    assert admin.partitions(topic)
    assert admin.ensure_compacted_topic(topic) is False

    model = f"live-model-{uuid.uuid4().hex[:8]}"
    with Session(engine) as session, session.begin():
        registry.register_version(session, model, 1, None, "models:/m-live", {})
    name = f"live-{uuid.uuid4().hex[:8]}"
    document = {"name": name, **spec_body(io_topics, model, 1)}
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(document))

    consumer = Consumer(consumer_config(stack_settings.kafka_bootstrap, "unused"))
    _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    consumer.close()
    deployed = run_cli(live_api, "deploy", "-f", str(path))
    assert deployed.returncode == 0, deployed.stderr
    assert f"deployment {name}: revision 1" in deployed.stdout

    # The background relay publishes it after commit; other tests may publish meanwhile.
    records = read_topic(stack_settings.kafka_bootstrap, topic, 1, start=end, timeout=30, key=name)
    assert records, f"the revision of {name} never reached {topic}"
    [(_, spec)] = records
    assert (spec.revision, spec.variants[0].model_name, spec.stopped) == (1, model, False)
