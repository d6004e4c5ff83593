"""The local Kafka is a real broker: partitions, keyed produce, group consume, commits, times."""

from __future__ import annotations

import time
import uuid
from collections import Counter

from confluent_kafka import Consumer, Producer, TopicPartition

from carrara.settings import Settings
from carrara.streams.client_config import consumer_config, producer_config
from carrara.streams.topics import TopicAdmin

MESSAGES = 10_000
KEYS = 97


def test_keyed_messages_round_trip_through_a_consumer_group(
    stack_settings: Settings, topic_name: str
) -> None:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    admin.create_topic(topic_name, partitions=3)
    assert admin.partitions(topic_name) == [0, 1, 2]

    producer = Producer(producer_config(stack_settings.kafka_bootstrap))
    base_ms = int(time.time() * 1000) - 60_000
    for i in range(MESSAGES):
        # Timestamps one millisecond apart, so offsets_for_times has a known answer.
        producer.produce(
            topic_name, key=f"entity-{i % KEYS}", value=f"{i}".encode(), timestamp=base_ms + i
        )
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0

    group = f"test-group-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(consumer_config(stack_settings.kafka_bootstrap, group))
    consumer.subscribe([topic_name])
    seen: list[tuple[str, int, int]] = []
    deadline = time.monotonic() + 60
    while len(seen) < MESSAGES and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=1000, timeout=1.0):
            assert msg.error() is None, msg.error()
            seen.append((msg.key().decode(), msg.partition(), int(msg.value())))
            consumer.store_offsets(msg)
    consumer.commit(asynchronous=False)

    assert sorted(v for _, _, v in seen) == list(range(MESSAGES))
    # The default partitioner keeps every key on exactly one partition.
    partitions_per_key: dict[str, set[int]] = {}
    for key, partition, _ in seen:
        partitions_per_key.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in partitions_per_key.values())
    per_partition = Counter(partition for _, partition, _ in seen)
    assert set(per_partition) == {0, 1, 2}

    committed = consumer.committed([TopicPartition(topic_name, p) for p in (0, 1, 2)], timeout=10)
    assert {tp.partition: tp.offset for tp in committed} == dict(per_partition)

    # offsets_for_times: the first offset at or after a timestamp, per partition.
    cut_ms = base_ms + MESSAGES // 2
    expected_after_cut = Counter(p for _, p, v in seen if v >= MESSAGES // 2)
    found = consumer.offsets_for_times(
        [TopicPartition(topic_name, p, cut_ms) for p in (0, 1, 2)], timeout=10
    )
    for tp in found:
        assert tp.error is None
        high = consumer.get_watermark_offsets(TopicPartition(topic_name, tp.partition))[1]
        assert high - tp.offset == expected_after_cut[tp.partition]
    consumer.close()
