"""Where a replay must start to warm windowed state: the horizon before a snapshot, by timestamp.

A feature set's windows reach back `horizon_ms` before an event, so a training run replays each
partition from the first record whose timestamp is at least (the timestamp of the snapshot's first
record) - horizon, found with `offsets_for_times`; those records only warm the state.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from confluent_kafka import Consumer, KafkaError, TopicPartition

from carrara.streams.replay import as_ranges, replay_config
from carrara.streams.snapshot import PartitionRange


def warmup_ranges(
    bootstrap: str,
    topic: str,
    offsets: Sequence[PartitionRange | Mapping[str, int]],
    horizon_ms: int,
    timeout: float = 10.0,
) -> list[PartitionRange]:
    """Per partition, `[warm_start, start)`: the records a replay reads before the snapshot."""
    ranges = [r for r in as_ranges(offsets) if r.count > 0 and r.start > 0]
    if not ranges:
        return []
    consumer = Consumer(replay_config(bootstrap, **{"auto.offset.reset": "earliest"}))
    try:
        warm: list[PartitionRange] = []
        for r in ranges:
            first = _first_timestamp(consumer, topic, r, timeout)
            low, _ = consumer.get_watermark_offsets(
                TopicPartition(topic, r.partition), timeout=timeout, cached=False
            )
            if first is None:
                continue
            found = consumer.offsets_for_times(
                [TopicPartition(topic, r.partition, max(first - horizon_ms, 0))], timeout=timeout
            )[0].offset
            start = min(max(found if found >= 0 else r.start, low), r.start)
            if start < r.start:
                warm.append(PartitionRange(r.partition, start, r.start))
        return warm
    finally:
        consumer.close()


def _first_timestamp(
    consumer: Consumer, topic: str, r: PartitionRange, timeout: float
) -> int | None:
    """The timestamp of the snapshot's first record in partition `r.partition` (None: none)."""
    consumer.assign([TopicPartition(topic, r.partition, r.start)])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    return None
                continue
            kind, stamp = msg.timestamp()
            return stamp if kind else None
        return None
    finally:
        consumer.unassign()
