"""What a consumed message carries besides key and value: its position and headers, typed.

confluent-kafka types `Message.topic()`, `.partition()` and `.offset()` as optional because a
message built by hand has none; every record and partition event a consumer returns has all three.
"""

from __future__ import annotations

from confluent_kafka import Message

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
