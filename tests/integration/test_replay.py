"""Replaying offset-pinned snapshots from the real Kafka, and decoding them into the matrix."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from carrara.settings import Settings
from carrara.streams.client_config import admin_config, producer_config
from carrara.streams.event_codec import decode_events, fit_feature_spec
from carrara.streams.replay import ReplayBatch, ReplayError, ReplayTimeout, replay_snapshot
from carrara.streams.snapshot import SnapshotMode, snapshot_offsets
from carrara.streams.topics import TopicAdmin

Record = tuple[int, int, bytes | None]  # partition, offset, value


def produce(bootstrap: str, topic: str, values: Iterable[tuple[int, bytes | None]]) -> list[Record]:
    """Write `(partition, value)` pairs in order; returns where each landed."""
    producer = Producer(producer_config(bootstrap))
    landed: list[Record] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        landed.append((msg.partition(), msg.offset(), msg.value()))

    for partition, value in values:
        producer.produce(topic, value=value, partition=partition, on_delivery=delivered)
    assert producer.flush(30) == 0
    return sorted(landed)


def records(batches: Iterable[ReplayBatch]) -> list[Record]:
    out: list[Record] = []
    for batch in batches:
        assert len(batch.values) == len(batch.partitions) == len(batch.offsets) > 0
        out.extend(
            zip(batch.partitions.tolist(), batch.offsets.tolist(), batch.values, strict=True)
        )
    return out


def ordered_per_partition(read: list[Record]) -> bool:
    last: dict[int, int] = {}
    for partition, offset, _ in read:
        if offset <= last.get(partition, -1):
            return False
        last[partition] = offset
    return True


def test_replay_reads_the_snapshot_and_nothing_produced_after_it(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    # Partition 1 stays empty until after the snapshot: its range is empty.
    before = produce(
        bootstrap,
        topic_name,
        [(0, b"p0-%d" % i) for i in range(40)] + [(2, b"p2-%d" % i) for i in range(25)],
    )
    snapshot = snapshot_offsets(bootstrap, topic_name, SnapshotMode.latest)
    offsets = [r.as_dict() for r in snapshot.ranges]
    assert offsets == [
        {"partition": 0, "start": 0, "end": 40},
        {"partition": 1, "start": 0, "end": 0},
        {"partition": 2, "start": 0, "end": 25},
    ]
    after = produce(
        bootstrap, topic_name, [(p, b"late-%d" % p) for p in (0, 1, 2) for _ in range(15)]
    )
    assert len(after) == 45

    progress: list[tuple[int, int]] = []
    read = records(
        replay_snapshot(
            bootstrap,
            topic_name,
            offsets,
            batch_size=7,
            on_progress=lambda done, total: progress.append((done, total)),
        )
    )
    assert sorted(read) == before
    assert ordered_per_partition(read)
    assert progress[-1] == (65, 65)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert len(progress) > 5  # one call per batch of at most 7


def test_replay_reads_explicit_ranges_in_the_middle_of_partitions(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    produced = produce(
        bootstrap, topic_name, [(p, b"%d-%d" % (p, i)) for p in (0, 1, 2) for i in range(30)]
    )
    ranges = [
        {"partition": 0, "start": 10, "end": 30},
        {"partition": 1, "start": 3, "end": 3},  # empty, though the partition has records
        {"partition": 2, "start": 5, "end": 12},  # records after the end are never read
    ]
    read = records(replay_snapshot(bootstrap, topic_name, ranges))
    expected = [
        r for r in produced if (r[0] == 0 and 10 <= r[1] < 30) or (r[0] == 2 and 5 <= r[1] < 12)
    ]
    assert sorted(read) == expected
    assert len(read) == 27

    # Nothing to read at all: no consumer, no error, progress says so.
    progress: list[tuple[int, int]] = []
    empty = [{"partition": p, "start": 4, "end": 4} for p in (0, 1, 2)]
    assert (
        records(
            replay_snapshot(bootstrap, topic_name, empty, on_progress=lambda *a: progress.append(a))
        )
        == []
    )
    assert progress == [(0, 0)]


def test_transaction_markers_and_aborted_records_do_not_stall_the_replay(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    producer = Producer(
        producer_config(bootstrap, **{"transactional.id": f"test-replay-{uuid.uuid4().hex}"})
    )
    producer.init_transactions(30)
    for prefix, commit in ((b"kept", True), (b"aborted", False), (b"also-kept", True)):
        producer.begin_transaction()
        for i in range(5 if prefix != b"kept" else 10):
            producer.produce(topic_name, value=b"%s-%d" % (prefix, i), partition=0)
        producer.flush(30)  # the aborted records reach the log too, as in real aborts
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
    # Layout of partition 0: kept 0-9, commit marker 10, aborted 11-15, abort marker 16,
    # also-kept 17-21, commit marker 22.
    snapshot = snapshot_offsets(bootstrap, topic_name, SnapshotMode.latest)
    assert snapshot.ranges[0].as_dict() == {"partition": 0, "start": 0, "end": 23}

    progress: list[tuple[int, int]] = []
    started = time.monotonic()
    read = records(
        replay_snapshot(
            bootstrap,
            topic_name,
            snapshot.ranges,
            idle_timeout=10,
            on_progress=lambda done, total: progress.append((done, total)),
        )
    )
    assert time.monotonic() - started < 8  # finished on the markers, not on the idle timeout
    assert [value for _, _, value in read] == [b"kept-%d" % i for i in range(10)] + [
        b"also-kept-%d" % i for i in range(5)
    ]
    assert [offset for _, offset, _ in read] == list(range(10)) + list(range(17, 22))
    assert progress[-1] == (23, 23)

    # A range holding only aborted records and a marker: nothing to read, and it ends.
    only_aborted = [{"partition": 0, "start": 11, "end": 17}]
    assert records(replay_snapshot(bootstrap, topic_name, only_aborted, idle_timeout=10)) == []


def test_offsets_an_open_transaction_holds_back_time_out_with_the_reason(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    producer = Producer(
        producer_config(bootstrap, **{"transactional.id": f"test-replay-{uuid.uuid4().hex}"})
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic_name, value=b"pending-%d" % i, partition=0)
    producer.flush(30)
    started = time.monotonic()
    try:
        with pytest.raises(
            ReplayTimeout, match=r"no progress for 2s; unread: partition 0 at offset 0 of \[0, 3\)"
        ):
            list(
                replay_snapshot(
                    bootstrap, topic_name, [{"partition": 0, "start": 0, "end": 3}], idle_timeout=2
                )
            )
        assert time.monotonic() - started < 10
    finally:
        producer.abort_transaction(30)


def test_missing_topics_and_deleted_records_fail_fast(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    one = [{"partition": 0, "start": 0, "end": 10}]
    with pytest.raises(ReplayError, match="does not exist"):
        list(replay_snapshot(bootstrap, topic_name, one))

    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    produce(bootstrap, topic_name, [(0, b"%d" % i) for i in range(10)])
    # Retention (here: an explicit delete) removed offsets 0-4: the snapshot cannot be replayed.
    admin = AdminClient(admin_config(bootstrap))
    for future in admin.delete_records([TopicPartition(topic_name, 0, 5)]).values():
        future.result(timeout=30)
    with pytest.raises(ReplayError, match=r"starts at offset 5 now.*deleted"):
        list(replay_snapshot(bootstrap, topic_name, one))
    assert (
        len(
            records(
                replay_snapshot(bootstrap, topic_name, [{"partition": 0, "start": 5, "end": 10}])
            )
        )
        == 5
    )

    with pytest.raises(ValueError, match="more than once"):
        list(replay_snapshot(bootstrap, topic_name, one + one))
    with pytest.raises(ValueError, match="start <= end"):
        list(replay_snapshot(bootstrap, topic_name, [{"partition": 0, "start": 5, "end": 2}]))


SCHEMA = {
    "key_field": "id",
    "label_field": "label",
    "task": "binary",
    "features": [
        {"name": "x", "type": "float"},
        {"name": "n", "type": "int"},
        {"name": "color", "type": "category"},
    ],
}


def test_replayed_events_decode_into_the_matrix_with_bad_events_counted(
    stack_settings: Settings, topic_name: str
) -> None:
    bootstrap = stack_settings.kafka_bootstrap
    TopicAdmin(bootstrap).create_topic(topic_name, partitions=3)
    rng = np.random.default_rng(5)
    events = []
    for i in range(600):
        if i % 100 == 7:
            events.append((i % 3, b'{"id": "broken'))  # undecodable
        elif i % 100 == 8:
            events.append((i % 3, orjson.dumps({"id": f"e{i}", "x": "high", "n": 1, "label": 0})))
        else:
            event = {
                "id": f"e{i}",
                "x": float(rng.normal()),
                "n": int(rng.integers(0, 100)),
                "color": ["red", "green", "blue"][i % 3],
                "label": bool(i % 2),
            }
            events.append((i % 3, orjson.dumps(event)))
    produced = produce(bootstrap, topic_name, events)
    snapshot = snapshot_offsets(bootstrap, topic_name, SnapshotMode.latest)

    decoded = decode_events(SCHEMA, replay_snapshot(bootstrap, topic_name, snapshot.ranges))
    assert decoded.rows == 588
    assert decoded.bad.count == 12
    raw = {(p, o): v or b"" for p, o, v in produced}
    bad_expected = {where for where, v in raw.items() if b"broken" in v or b'"high"' in v}
    assert {(s["partition"], s["offset"]) for s in decoded.bad.samples} == bad_expected

    spec = fit_feature_spec(decoded)
    matrix = spec.transform(decoded)
    labels = spec.encode_labels(decoded)
    assert labels is not None
    colors = spec.vocabularies["color"]
    assert colors == ["blue", "green", "red"]
    rows = list(zip(decoded.partitions.tolist(), decoded.offsets.tolist(), strict=True))
    assert sorted(rows) == sorted(set(raw) - bad_expected)
    for row, where in enumerate(rows):
        event = orjson.loads(raw[where])
        assert matrix[row].tolist() == [event["x"], event["n"], colors.index(event["color"])]
        assert decoded.keys[row] == event["id"]
        assert labels[row] == int(event["label"])
