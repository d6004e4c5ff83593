"""Replay an offset-pinned snapshot: read exactly `[start, end)` of each partition of a topic.

The reader assigns the partitions itself (no consumer group, nothing committed) and stops each
partition at its end offset, so records appended after the snapshot are never read and the same
snapshot always yields the same records. Offsets may jump: transaction markers, aborted records
(skipped under `read_committed`) and compaction leave offsets without a record, so a partition is
finished when the next offset to read reaches its end, not when `end - start` records were seen.
A replay never hangs: it fails with `ReplayTimeout` after `idle_timeout` seconds without progress.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import compress
from typing import Any, NamedTuple

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from carrara.streams.client_config import consumer_config
from carrara.streams.consumed import position as consumed_position
from carrara.streams.snapshot import PartitionRange

# Records per consume() call: batching is what makes the Python client fast (benchmarks/RESULTS.md).
DEFAULT_BATCH_SIZE = 1000
DEFAULT_IDLE_TIMEOUT = 60.0
# How long one consume() call may wait; bounds how late the idle timeout is noticed.
_POLL_TIMEOUT = 0.5

ProgressCallback = Callable[[int, int], None]

# Unbound accessors, mapped over a whole batch in C rather than called in a Python loop.
_error = Message.error
_partition = Message.partition
_offset = Message.offset
_value = Message.value


class ReplayError(RuntimeError):
    """The snapshot cannot be replayed (topic or offsets gone, or a Kafka error)."""


class ReplayTimeout(ReplayError):
    """No progress for longer than the idle timeout: some offsets of the snapshot are unreadable."""


class ReplayBatch(NamedTuple):
    """Records of one consume() call that fall inside the snapshot, as parallel columns."""

    values: list[bytes | None]
    partitions: np.ndarray  # int32
    offsets: np.ndarray  # int64


def as_ranges(offsets: Sequence[PartitionRange | Mapping[str, int]]) -> list[PartitionRange]:
    """Snapshot offsets (`PartitionRange`s or `{partition, start, end}` dicts), validated."""
    ranges: list[PartitionRange] = []
    seen: set[int] = set()
    for item in offsets:
        r = item if isinstance(item, PartitionRange) else _range_from_mapping(item)
        if r.partition < 0 or r.start < 0 or r.end < r.start:
            raise ValueError(
                f"invalid range for partition {r.partition}: [{r.start}, {r.end}) "
                "(need partition >= 0 and 0 <= start <= end)"
            )
        if r.partition in seen:
            raise ValueError(f"partition {r.partition} is given more than once")
        seen.add(r.partition)
        ranges.append(r)
    return sorted(ranges, key=lambda r: r.partition)


def _range_from_mapping(item: Mapping[str, int]) -> PartitionRange:
    try:
        return PartitionRange(int(item["partition"]), int(item["start"]), int(item["end"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"a snapshot range needs integer partition, start and end: {item!r}"
        ) from exc


def snapshot_event_count(offsets: Sequence[PartitionRange | Mapping[str, int]]) -> int:
    """`sum(end - start)`: the offsets a replay covers (an upper bound on its records)."""
    return sum(r.count for r in as_ranges(offsets))


def replay_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """The consumer settings of a replay: tuned fetches, a throwaway group, never a commit."""
    return consumer_config(
        bootstrap,
        # Never joins (assign() only) and never commits: the id only satisfies librdkafka.
        f"carrara-replay-{uuid.uuid4().hex}",
        **{
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # Tells us when a partition has nothing more to give, so a range ending in
            # transaction markers or compacted offsets still finishes.
            "enable.partition.eof": True,
            # An offset outside the log must fail the replay, not silently restart it from the
            # earliest record (the default here), which would read records outside the snapshot.
            "auto.offset.reset": "error",
            # Decoding is slower than fetching, so the prefetch queue fills up; librdkafka then
            # postpones the next fetch by this long (default 1000 ms) and the reader idles: with
            # the default, replay + decode here sat ~70% idle at ~100k events/s; with 10 ms it
            # stays busy at ~300k events/s (benchmarks/replay.py).
            "fetch.queue.backoff.ms": 10,
            **overrides,
        },
    )


def replay_snapshot(
    bootstrap: str,
    topic: str,
    offsets: Sequence[PartitionRange | Mapping[str, int]],
    *,
    on_progress: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    config: Mapping[str, Any] | None = None,
) -> Iterator[ReplayBatch]:
    """Yield the records of `topic` in exactly the `[start, end)` ranges of `offsets`, in batches.

    `on_progress(events_read, events_total)` is called after every batch; both count offsets
    (`events_total = sum(end - start)`), so `events_read` reaches `events_total` exactly when the
    replay completes, even where transaction markers or compaction left offsets without a record.
    """
    ranges = as_ranges(offsets)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ends = {r.partition: r.end for r in ranges if r.count > 0}
    starts = {r.partition: r.start for r in ranges if r.count > 0}
    total = sum(r.count for r in ranges)
    if not ends:
        if on_progress is not None:
            on_progress(0, 0)
        return

    consumer = Consumer(replay_config(bootstrap, **(config or {})))
    try:
        _check_watermarks(consumer, topic, ranges)
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in ends])
        # Next offset to read per open partition; a partition leaves the dict when finished.
        position = dict(starts)
        # The end offset of each open partition, indexed by partition id (-1: closed), so a
        # whole batch is checked against the ranges in a few numpy operations.
        limit = np.full(max(ends) + 1, -1, dtype=np.int64)
        for p, end in ends.items():
            limit[p] = end
        done_offsets = 0
        last_progress = time.monotonic()
        while position:
            messages = consumer.consume(num_messages=batch_size, timeout=_POLL_TIMEOUT)
            finished: set[int] = set()
            values: list[bytes | None] = []
            if messages and any(map(_error, messages)):
                messages = _records_only(messages, topic, position, ends, finished)
            count = len(messages)
            if count:
                partitions = np.fromiter(map(_partition, messages), dtype=np.int32, count=count)
                offsets_read = np.fromiter(map(_offset, messages), dtype=np.int64, count=count)
                ends_of_rows = limit[partitions]
                inside = offsets_read < ends_of_rows  # closed partitions never are (end -1)
                # Offsets ascend per partition: a record at or past `end - 1` ends its range.
                reached = (offsets_read + 1 >= ends_of_rows) & (ends_of_rows >= 0)
                finished.update(np.unique(partitions[reached]).tolist())
                values = list(map(_value, messages))
                if not inside.all():
                    values = list(compress(values, inside))
                    partitions, offsets_read = partitions[inside], offsets_read[inside]
                for p in np.unique(partitions).tolist():
                    position[p] = int(offsets_read[partitions == p][-1]) + 1
            for p in finished:
                if position.pop(p, None) is not None:
                    done_offsets += ends[p] - starts[p]
                    limit[p] = -1
                    # Stop fetching past the end: post-snapshot records are never wanted.
                    consumer.pause([TopicPartition(topic, p)])
            if values or finished:
                last_progress = time.monotonic()
                if on_progress is not None:
                    read = done_offsets + sum(position[p] - starts[p] for p in position)
                    on_progress(read, total)
                if values:
                    yield ReplayBatch(values, partitions, offsets_read)
            elif time.monotonic() - last_progress > idle_timeout:
                stuck = ", ".join(
                    f"partition {p} at offset {position[p]} of [{starts[p]}, {ends[p]})"
                    for p in sorted(position)
                )
                raise ReplayTimeout(
                    f"replay of '{topic}' made no progress for {idle_timeout:g}s; unread: {stuck}. "
                    "The offsets are not readable (an open transaction holds them back, or the "
                    "topic was truncated or recreated since the snapshot)"
                )
    finally:
        consumer.close()


def _records_only(
    messages: list[Message],
    topic: str,
    position: dict[int, int],
    ends: dict[int, int],
    finished: set[int],
) -> list[Message]:
    """The records of a batch without its events; end-of-partition events finish ranges."""
    records = []
    for msg in messages:
        error = msg.error()
        if error is None:
            records.append(msg)
            continue
        if error.code() != KafkaError._PARTITION_EOF:
            raise ReplayError(_describe_error(topic, msg.partition(), error))
        _, p, offset = consumed_position(msg)
        # The log ends here for now: finished if the end was reached, otherwise later offsets
        # are not readable yet (an open transaction holds them back): wait, bounded.
        if p in position and offset >= ends[p]:
            finished.add(p)
    return records


def _check_watermarks(consumer: Consumer, topic: str, ranges: list[PartitionRange]) -> None:
    """Fail fast, with the reason, when the log no longer holds the snapshot's records."""
    for r in ranges:
        if r.count == 0:
            continue
        try:
            low, _ = consumer.get_watermark_offsets(
                TopicPartition(topic, r.partition), timeout=10, cached=False
            )
        except KafkaException as exc:
            raise ReplayError(_describe_error(topic, r.partition, exc.args[0])) from exc
        if r.start < low:
            raise ReplayError(
                f"partition {r.partition} of '{topic}' starts at offset {low} now, after the "
                f"snapshot's start {r.start}: the records were deleted (retention), so the "
                "snapshot can no longer be replayed"
            )
    # The high watermark is not checked here: under read_committed it is the last stable
    # offset, which an open transaction holds back; the idle timeout covers what never comes.


def _describe_error(topic: str, partition: int | None, error: KafkaError) -> str:
    where = f"'{topic}'" if partition is None or partition < 0 else f"'{topic}' [{partition}]"
    if error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
        return f"cannot replay {where}: the topic or partition does not exist"
    if error.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
        return (
            f"cannot replay {where}: the snapshot's offsets are outside the log "
            f"(deleted by retention, or the topic was recreated): {error.str()}"
        )
    return f"Kafka error while replaying {where}: {error.str()}"
