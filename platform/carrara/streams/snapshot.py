"""Snapshots of a topic as per-partition `[start, end)` offsets, and samples of recent events.

A snapshot pins exactly which records a training run replays, so the run is reproducible from the
log for as long as the records are retained. Three ways to choose the offsets:

- `latest`: everything retained up to now (low to high watermark of each partition);
- `time_range`: records with timestamps in `[from, to)`, resolved with `offsets_for_times`;
- `explicit`: ranges given by the caller, checked against the watermarks.

The event count is `sum(end - start)`: exact for plain topics; on compacted or transactional
topics some offsets hold no record (removed by compaction, or transaction markers).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from carrara.streams.client_config import consumer_config
from carrara.streams.consumed import position
from carrara.streams.topics import TopicAdmin

# offsets_for_times answers -1 for a partition with no record at or after the timestamp.
OFFSET_END = -1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SnapshotMode(StrEnum):
    latest = "latest"
    time_range = "time_range"
    explicit = "explicit"


class SnapshotError(ValueError):
    """The request cannot be turned into a snapshot; `errors` says what is wrong, per item."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class TopicNotFound(SnapshotError):
    def __init__(self, topic: str) -> None:
        super().__init__(f"topic '{topic}' does not exist in Kafka")
        self.topic = topic


@dataclass(frozen=True)
class PartitionRange:
    """Records `start <= offset < end` of one partition."""

    partition: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start

    def as_dict(self) -> dict[str, int]:
        return {"partition": self.partition, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Snapshot:
    topic: str
    ranges: tuple[PartitionRange, ...]

    @property
    def event_count(self) -> int:
        return sum(r.count for r in self.ranges)


@dataclass(frozen=True)
class SampledEvent:
    partition: int
    offset: int
    timestamp_ms: int | None
    value: bytes | None


Watermarks = dict[int, tuple[int, int]]  # partition -> (low, high)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def epoch_ms(moment: datetime) -> int:
    """Kafka time of `moment`: ms since the epoch, rounded up (naive = UTC); refuses pre-1970."""
    moment = _aware(moment)
    if moment < EPOCH:
        # Negative timestamps mean "latest"/"earliest" to the ListOffsets API, not a time.
        raise SnapshotError(f"{moment.isoformat()} is before 1970-01-01, the epoch of Kafka time")
    # Rounded up, so that `>= moment` holds for the ms timestamps of the records selected.
    micros = (moment - EPOCH) // timedelta(microseconds=1)
    return -(-micros // 1000)


def check_explicit(watermarks: Watermarks, requested: Sequence[PartitionRange]) -> list[dict]:
    """Problems of explicit ranges: each partition exactly once, `low <= start <= end <= high`."""
    errors: list[dict[str, Any]] = []
    seen: set[int] = set()
    for item in requested:
        p = item.partition
        if p not in watermarks:
            errors.append(
                {
                    "partition": p,
                    "message": f"partition {p} does not exist "
                    f"(the topic has partitions 0..{max(watermarks)})"
                    if watermarks
                    else f"partition {p} does not exist",
                }
            )
            continue
        if p in seen:
            errors.append({"partition": p, "message": f"partition {p} is given more than once"})
            continue
        seen.add(p)
        low, high = watermarks[p]
        if item.start > item.end:
            errors.append(
                {"partition": p, "message": f"start {item.start} is after end {item.end}"}
            )
        if item.start < low:
            errors.append(
                {
                    "partition": p,
                    "message": f"start {item.start} is before the low watermark {low} "
                    "(older records are no longer retained)",
                }
            )
        if item.end > high:
            errors.append(
                {
                    "partition": p,
                    "message": f"end {item.end} is past the high watermark {high} "
                    "(records not written yet)",
                }
            )
    for p in sorted(set(watermarks) - seen):
        low, high = watermarks[p]
        errors.append(
            {
                "partition": p,
                "message": f"partition {p} is missing: give every partition a range "
                f"(start = end for none; retained offsets are {low}..{high})",
            }
        )
    return errors


def resolve_time_range(
    watermarks: Watermarks, starts: dict[int, int] | None, ends: dict[int, int] | None
) -> list[PartitionRange]:
    """Ranges from `offsets_for_times` answers (-1 = no record that late: the high watermark)."""
    ranges = []
    for p, (low, high) in sorted(watermarks.items()):
        if starts is None:
            start = low
        elif starts[p] == OFFSET_END:
            start = high  # nothing at or after `from` in this partition
        else:
            start = max(starts[p], low)
        # Clamp to the watermarks read first, so a record appended between the lookups is
        # either wholly in the snapshot or wholly out of it.
        end = high if ends is None or ends[p] == OFFSET_END else min(ends[p], high)
        # The first record at or after `from` never follows the first one at or after `to`.
        ranges.append(PartitionRange(p, min(start, end), end))
    return ranges


def sample_quota(available: dict[int, int], limit: int) -> dict[int, int]:
    """How many of its newest records to read per partition: `limit` in all, spread evenly."""
    quota = dict.fromkeys(available, 0)
    remaining = min(limit, sum(available.values()))
    open_partitions = sorted(p for p, n in available.items() if n > 0)
    while remaining > 0 and open_partitions:
        share = max(1, remaining // len(open_partitions))
        for p in list(open_partitions):
            take = min(share, available[p] - quota[p], remaining)
            quota[p] += take
            remaining -= take
            if quota[p] == available[p]:
                open_partitions.remove(p)
            if remaining == 0:
                break
    return quota


@contextmanager
def _consumer(bootstrap: str, **overrides: Any) -> Iterator[Consumer]:
    # A throwaway group that never joins or commits: the consumer only assigns and reads.
    consumer = Consumer(
        consumer_config(bootstrap, f"carrara-snapshot-{uuid.uuid4().hex}", **overrides)
    )
    try:
        yield consumer
    finally:
        consumer.close()


def _watermarks(
    consumer: Consumer, topic: str, partitions: list[int], timeout: float
) -> Watermarks:
    marks = {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, p), timeout=timeout, cached=False
        )
        marks[p] = (low, high)
    return marks


def _offsets_for_times(
    consumer: Consumer, topic: str, partitions: list[int], millis: int, timeout: float
) -> dict[int, int]:
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, millis) for p in partitions], timeout=timeout
    )
    for tp in found:
        if tp.error is not None:
            raise KafkaException(tp.error)
    return {tp.partition: tp.offset for tp in found}


def topic_partitions(bootstrap: str, topic: str, timeout: float = 10.0) -> list[int]:
    """Partition ids of `topic`; raises TopicNotFound (KafkaException if Kafka is unreachable)."""
    partitions = TopicAdmin(bootstrap).partitions(topic, timeout=timeout)
    if not partitions:
        raise TopicNotFound(topic)
    return partitions


def snapshot_offsets(
    bootstrap: str,
    topic: str,
    mode: SnapshotMode,
    *,
    time_from: datetime | None = None,
    time_to: datetime | None = None,
    offsets: Sequence[PartitionRange] | None = None,
    timeout: float = 10.0,
) -> Snapshot:
    """Resolve per-partition `[start, end)` offsets of `topic` for `mode` (`time_to` exclusive)."""
    partitions = topic_partitions(bootstrap, topic, timeout)
    with _consumer(bootstrap) as consumer:
        watermarks = _watermarks(consumer, topic, partitions, timeout)
        if mode is SnapshotMode.latest:
            ranges = [PartitionRange(p, low, high) for p, (low, high) in watermarks.items()]
        elif mode is SnapshotMode.time_range:
            if time_from is None and time_to is None:
                raise SnapshotError("a time range needs `from`, `to` or both")
            if (
                time_from is not None
                and time_to is not None
                and _aware(time_from) >= _aware(time_to)
            ):
                raise SnapshotError("`from` must be before `to` (`to` is exclusive)")
            from_ms = epoch_ms(time_from) if time_from is not None else None
            to_ms = epoch_ms(time_to) if time_to is not None else None
            starts = (
                None
                if from_ms is None
                else _offsets_for_times(consumer, topic, partitions, from_ms, timeout)
            )
            ends = (
                None
                if to_ms is None
                else _offsets_for_times(consumer, topic, partitions, to_ms, timeout)
            )
            ranges = resolve_time_range(watermarks, starts, ends)
        else:
            errors = check_explicit(watermarks, offsets or [])
            if errors:
                raise SnapshotError(
                    f"the offsets do not fit topic '{topic}': "
                    + "; ".join(e["message"] for e in errors),
                    errors,
                )
            ranges = list(offsets or [])
    return Snapshot(topic, tuple(sorted(ranges, key=lambda r: r.partition)))


def read_recent_events(
    bootstrap: str, topic: str, limit: int = 200, timeout: float = 10.0
) -> list[SampledEvent]:
    """Up to `limit` of the newest records of `topic`, spread over its partitions, newest first."""
    partitions = topic_partitions(bootstrap, topic, timeout)
    events: list[SampledEvent] = []
    with _consumer(bootstrap, **{"enable.partition.eof": True}) as consumer:
        watermarks = _watermarks(consumer, topic, partitions, timeout)
        quota = sample_quota({p: high - low for p, (low, high) in watermarks.items()}, limit)
        # Read each partition from `high - quota` to the high watermark seen now; records
        # appended meanwhile are ignored so the read always ends.
        pending = {p: watermarks[p][1] for p, n in quota.items() if n > 0}
        if not pending:
            return []
        consumer.assign([TopicPartition(topic, p, pending[p] - quota[p]) for p in pending])
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.05):
                error = msg.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                _, p, offset = position(msg)
                if error is not None:  # the end of the partition
                    pending.pop(p, None)
                    continue
                if p not in pending or offset >= pending[p]:
                    pending.pop(p, None)
                    continue
                kind, stamp = msg.timestamp()
                events.append(SampledEvent(p, offset, stamp if kind else None, msg.value()))
                if offset + 1 >= pending[p]:
                    pending.pop(p, None)
        if pending:
            raise KafkaException(
                KafkaError(
                    KafkaError._TIMED_OUT,
                    f"timed out reading recent events of partitions {sorted(pending)}",
                )
            )
    events.sort(key=lambda e: (e.timestamp_ms or 0, e.offset), reverse=True)
    return events[:limit]
