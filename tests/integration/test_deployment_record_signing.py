"""Deployment records are authenticated: the relay signs what it publishes, a scorer with a
signing key applies only records keyed by their deployment and signed with that key.

A real scorer process, real Kafka and MLflow, a test-specific deployments topic; records are
produced as the control plane (or an intruder with write access to the topic) would.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from carrara.deployments.revisions import republish
from carrara.deployments.service import publishing
from carrara.outbox.relay import OutboxRelay
from carrara.registry import service as registry
from carrara.settings import Settings, get_settings
from carrara.streams.client_config import consumer_config, producer_config
from carrara.streams.deployment_spec import DeploymentSpec, decode_spec, encode_spec
from carrara.streams.record_signing import SIGNATURE_HEADER, header_value, record_problem, sign
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import ROOT, RUN_ID
from tests.integration.test_scorer import ScoringEnv, _register, _status_of, _variants

SIGNING_KEY = "test-signing-key-" + uuid.uuid4().hex
WRONG_KEY = "some-other-key-" + uuid.uuid4().hex


class SignedScoringEnv(ScoringEnv):
    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "CARRARA_DEPLOYMENT_SIGNING_KEY": SIGNING_KEY}

    def spec(self, pool: str, name: str) -> DeploymentSpec:
        self.revision += 1
        return DeploymentSpec(
            name=name,
            revision=self.revision,
            salt=f"salt-{RUN_ID}",
            published_at=datetime.now(UTC),
            input_topic=self.topics["input"],
            output_topic=self.topics["output"],
            key_field="card_id",
            pool=pool,
            variants=tuple(_variants(self.model, self.versions, 100, 0)[:1]),
        )

    def send(self, spec: DeploymentSpec, *, key: str, signing_key: str | None) -> None:
        value = encode_spec(spec)
        headers = []
        if signing_key is not None:
            headers.append((SIGNATURE_HEADER, sign(signing_key.encode(), key, value)))
        producer = Producer(producer_config(self.settings.kafka_bootstrap))
        producer.produce(self.topics["deployments"], key=key, value=value, headers=headers)
        assert producer.flush(10) == 0


@pytest.fixture(scope="module")
def signed(stack_settings: Settings) -> Iterator[SignedScoringEnv]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    topics = {
        name: f"test-{RUN_ID}-signed-{name}-{uuid.uuid4().hex[:6]}"
        for name in ("input", "output", "deployments", "status")
    }
    admin.create_topic(topics["input"], partitions=1)
    admin.create_topic(topics["output"], partitions=1)
    admin.ensure_compacted_topic(topics["deployments"])
    admin.ensure_compacted_topic(topics["status"])
    model = f"signed-test-{RUN_ID}"
    v1, _ = _register(stack_settings, model, 1.0)
    env = SignedScoringEnv(stack_settings, model, {"v1": v1, "v2": v1}, topics)
    yield env
    for instance in list(env.processes):
        env.stop_scorer(instance, signal.SIGKILL)
    admin.delete_topics([*topics.values(), f"{topics['input']}.dead-letters"])


def _wait_for(check: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _rejected(env: SignedScoringEnv, instance: str) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{env.ports[instance]}/metrics", timeout=5).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("carrara_scorer_rejected_records_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('reason="')[1].split('"')[0]] = float(value)
    return counts


def test_a_scorer_applies_signed_records_and_refuses_the_others(signed: SignedScoringEnv) -> None:
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    name = f"signed-{uuid.uuid4().hex[:6]}"
    instance = f"signed-{uuid.uuid4().hex[:4]}"
    # Before the scorer starts: a good revision, then a forged one it must skip while catching up.
    first = signed.spec(pool, name)
    signed.send(first, key=name, signing_key=SIGNING_KEY)
    forged_early = signed.spec(pool, name)
    signed.send(forged_early, key=name, signing_key=WRONG_KEY)
    signed.start_scorer(instance, pool)
    signed.wait_ready(instance)
    status = _wait_for(lambda: _status_of(signed, instance, name), "the first status")
    assert status.served_revision == first.revision
    assert status.last_error is not None
    assert f"refused revision {forged_early.revision}" in status.last_error
    assert "signature does not verify" in status.last_error

    # After it caught up: unsigned, wrongly signed, and a signed spec under another deployment's
    # key are refused; the first revision keeps serving.
    unsigned = signed.spec(pool, name)
    signed.send(unsigned, key=name, signing_key=None)
    wrong = signed.spec(pool, name)
    signed.send(wrong, key=name, signing_key=WRONG_KEY)
    misplaced = signed.spec(pool, name)
    signed.send(misplaced, key=f"{name}-other", signing_key=SIGNING_KEY)
    _wait_for(
        lambda: _rejected(signed, instance) == {"signature": 3.0, "key": 1.0},
        "the rejected-records metric",
    )
    status = _wait_for(
        lambda: (
            (s := _status_of(signed, instance, name))
            and s.last_error
            and f"refused revision {misplaced.revision}" in s.last_error
            and s
        ),
        "the refusal in the scorer status",
    )
    assert f"record key '{name}-other' is not the deployment name" in status.last_error
    assert status.served_revision == first.revision
    assert status.desired_revision == first.revision

    # A correctly signed revision is applied and clears the error.
    good = signed.spec(pool, name)
    signed.send(good, key=name, signing_key=SIGNING_KEY)
    status = _wait_for(
        lambda: (
            (s := _status_of(signed, instance, name)) and s.served_revision == good.revision and s
        ),
        "the signed revision to be served",
    )
    assert status.last_error is None
    log = (ROOT / ".carrara" / "logs" / f"test-scorer-{RUN_ID}-{instance}.log").read_text()
    assert "deployment record refused" in log
    assert SIGNING_KEY not in log
    signed.stop_scorer(instance)


def test_the_relay_signs_deployment_records_over_their_exact_bytes(
    client: TestClient,
    editor_headers: dict[str, str],
    db_session: Session,
    stack_settings: Settings,
    test_settings: Settings,
    topic_name: str,
    io_topics: tuple[str, str],
) -> None:
    TopicAdmin(stack_settings.kafka_bootstrap).ensure_compacted_topic(topic_name)
    settings = test_settings.model_copy(update={"deployments_topic": topic_name})
    client.app.dependency_overrides[get_settings] = lambda: settings  # type: ignore[attr-defined]
    registry.register_version(db_session, "signed-model", 1, None, "models:/m-1", {})
    body = {
        "input_topic": io_topics[0],
        "output_topic": io_topics[1],
        "key_field": "user_id",
        "variants": [{"name": "a", "model": "signed-model", "version": 1, "weight": 100}],
    }
    put = client.put("/api/v1/deployments/signed-a", json=body, headers=editor_headers)
    assert put.status_code == 201, put.text

    relay = OutboxRelay(stack_settings.kafka_bootstrap, signing=(topic_name, SIGNING_KEY.encode()))
    assert relay.run_once(db_session) >= 1
    consumer = Consumer(consumer_config(stack_settings.kafka_bootstrap, f"t-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic_name, 0, OFFSET_BEGINNING)])
    message = None
    deadline = time.monotonic() + 30
    while message is None and time.monotonic() < deadline:
        polled = consumer.poll(0.5)
        if polled is not None and polled.error() is None:
            message = polled
    consumer.close()
    assert message is not None
    value = message.value()
    assert value is not None
    signature = header_value(message.headers())
    keys = [SIGNING_KEY.encode()]
    assert record_problem(keys, message.key(), value, signature, "signed-a") is None
    assert record_problem([WRONG_KEY.encode()], message.key(), value, signature, "signed-a")
    assert record_problem(keys, message.key(), value + b" ", signature, "signed-a")


def test_republishing_replaces_unsigned_records_by_signed_ones(
    client: TestClient,
    editor_headers: dict[str, str],
    db_session: Session,
    stack_settings: Settings,
    test_settings: Settings,
    topic_name: str,
    io_topics: tuple[str, str],
) -> None:
    TopicAdmin(stack_settings.kafka_bootstrap).ensure_compacted_topic(topic_name)
    settings = test_settings.model_copy(update={"deployments_topic": topic_name})
    client.app.dependency_overrides[get_settings] = lambda: settings  # type: ignore[attr-defined]
    registry.register_version(db_session, "republished-model", 1, None, "models:/m-1", {})
    body = {
        "input_topic": io_topics[0],
        "output_topic": io_topics[1],
        "key_field": "user_id",
        "variants": [{"name": "a", "model": "republished-model", "version": 1, "weight": 100}],
    }
    assert client.put("/api/v1/deployments/rep-a", json=body, headers=editor_headers).is_success
    OutboxRelay(stack_settings.kafka_bootstrap).run_once(db_session)  # before the key: unsigned
    assert republish(db_session, publishing(settings)) >= 1
    relay = OutboxRelay(stack_settings.kafka_bootstrap, signing=(topic_name, SIGNING_KEY.encode()))
    relay.run_once(db_session)

    consumer = Consumer(consumer_config(stack_settings.kafka_bootstrap, f"t-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(topic_name, 0, OFFSET_BEGINNING)])
    records = []
    deadline = time.monotonic() + 30
    while len(records) < 2 and time.monotonic() < deadline:
        polled = consumer.poll(0.5)
        # Every deployment of the (shared) test database is republished: keep this one's.
        if polled is not None and polled.error() is None and polled.key() == b"rep-a":
            records.append(polled)
    consumer.close()
    keys = [SIGNING_KEY.encode()]
    unsigned, signed_again = records
    assert record_problem(keys, unsigned.key(), unsigned.value() or b"", None, "rep-a")
    assert (
        record_problem(
            keys,
            signed_again.key(),
            signed_again.value() or b"",
            header_value(signed_again.headers()),
            "rep-a",
        )
        is None
    )
    assert decode_spec(signed_again.value() or b"").revision == 1  # the same revision, again
