"""What a consumed message carries besides key and value: its position and headers, typed.

confluent-kafka types `Message.topic()`, `.partition()` and `.offset()` as optional because a
message built by hand has none; every record and partition event a consumer returns has all three.
"""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Message, TopicPartition

# Record headers as confluent-kafka produces and consumes them (a consumed value may be null).
Headers = list[tuple[str, str | bytes | None]]


def headers(msg: Message) -> Headers | None:
    """The headers of a message returned by a consumer: a list (or None when it has none)."""
    raw = msg.headers()
    return list(raw.items()) if isinstance(raw, dict) else raw


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a message returned by a consumer."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"message has no position: {topic!r} [{partition}] @ {offset}")
    return topic, partition, offset


def first_offsets(messages: Sequence[Message]) -> dict[tuple[str, int], int]:
    """The lowest offset consumed per (topic, partition): where a rewind seeks back to."""
    first: dict[tuple[str, int], int] = {}
    for m in messages:
        topic, partition, offset = position(m)
        key = (topic, partition)
        first[key] = min(first.get(key, offset), offset)
    return first


def next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """The offsets to commit after `messages`: the highest consumed per partition, plus one."""
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        topic, partition, offset = position(m)
        key = (topic, partition)
        last[key] = max(last.get(key, -1), offset)
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
