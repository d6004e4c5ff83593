"""Where a consumed message sits: its topic, partition and offset, as plain values.

confluent-kafka types `Message.topic()`, `.partition()` and `.offset()` as optional because a
message built by hand has none; every record and partition event a consumer returns has all three.
"""

from __future__ import annotations

from confluent_kafka import Message


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a message returned by a consumer."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"message has no position: {topic!r} [{partition}] @ {offset}")
    return topic, partition, offset
