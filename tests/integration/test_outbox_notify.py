"""A commit in any process wakes the relay at once (Postgres NOTIFY), not on its next poll."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from carrara.db import libpq_conninfo
from carrara.models import OutboxMessage
from carrara.outbox.relay import BackgroundRelay, OutboxListener, OutboxRelay
from carrara.outbox.service import enqueue_kafka
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin


def test_a_commit_elsewhere_is_relayed_at_once_through_notify(
    engine: Engine, test_database_url: str, stack_settings: Settings, topic_name: str
) -> None:
    TopicAdmin(stack_settings.kafka_bootstrap).create_topic(topic_name, 1)
    sessions = sessionmaker(bind=engine)
    # Polling every 10 minutes: only the NOTIFY can deliver within the test's time.
    relay = BackgroundRelay(OutboxRelay(stack_settings.kafka_bootstrap), sessions, poll_s=600)
    listener = OutboxListener(libpq_conninfo(test_database_url))
    relay.start()
    listener.start()
    try:
        assert listener.listening.wait(10)
        key = f"k-{uuid.uuid4().hex}"
        # Committed by a session of our own: no in-process wake() (as from another API process).
        with Session(engine) as session, session.begin():
            row_id = enqueue_kafka(session, topic_name, key, {"n": 1}).id
        committed = time.monotonic()
        deadline = committed + 10
        published = None
        while published is None:
            assert time.monotonic() < deadline, "the relay did not wake on the NOTIFY"
            with Session(engine) as session:
                published = session.scalar(
                    select(OutboxMessage.published_at).where(OutboxMessage.id == row_id)
                )
            time.sleep(0.02)
        relayed_in = time.monotonic() - committed
    finally:
        listener.stop()
        relay.stop()
    assert relayed_in < 5  # (measured ~20 ms; without the NOTIFY it waits for the 600 s poll)
    consumer = Consumer(
        {"bootstrap.servers": stack_settings.kafka_bootstrap, "group.id": uuid.uuid4().hex}
    )
    consumer.assign([TopicPartition(topic_name, 0, 0)])
    message = consumer.poll(10)
    consumer.close()
    assert message is not None
    assert message.key() == key.encode()
