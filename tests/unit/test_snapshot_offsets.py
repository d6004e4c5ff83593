"""The pure parts of snapshotting: explicit-range checks, time-range resolution, sample quotas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from carrara.streams.snapshot import (
    OFFSET_END,
    PartitionRange,
    Snapshot,
    SnapshotError,
    check_explicit,
    epoch_ms,
    resolve_time_range,
    sample_quota,
)

WATERMARKS = {0: (0, 10), 1: (5, 20), 2: (0, 0)}


def messages(errors: list[dict]) -> list[tuple[int, str]]:
    return [(e["partition"], e["message"]) for e in errors]


def test_explicit_ranges_within_the_watermarks_are_accepted() -> None:
    ranges = [PartitionRange(0, 0, 10), PartitionRange(1, 7, 7), PartitionRange(2, 0, 0)]
    assert check_explicit(WATERMARKS, ranges) == []


def test_explicit_ranges_outside_the_watermarks_are_refused_per_partition() -> None:
    errors = messages(
        check_explicit(
            WATERMARKS,
            [PartitionRange(0, 3, 11), PartitionRange(1, 4, 6), PartitionRange(2, 0, 0)],
        )
    )
    assert errors == [
        (0, "end 11 is past the high watermark 10 (records not written yet)"),
        (1, "start 4 is before the low watermark 5 (older records are no longer retained)"),
    ]


def test_explicit_ranges_must_name_each_partition_exactly_once() -> None:
    errors = messages(
        check_explicit(
            WATERMARKS,
            [
                PartitionRange(0, 5, 2),
                PartitionRange(0, 0, 1),
                PartitionRange(7, 0, 1),
            ],
        )
    )
    assert errors[0] == (0, "start 5 is after end 2")
    assert errors[1] == (0, "partition 0 is given more than once")
    assert errors[2] == (7, "partition 7 does not exist (the topic has partitions 0..2)")
    assert [p for p, _ in errors[3:]] == [1, 2]
    assert all("is missing" in m for _, m in errors[3:])


def test_a_time_range_keeps_offsets_within_the_watermarks() -> None:
    ranges = resolve_time_range(
        WATERMARKS, {0: 3, 1: OFFSET_END, 2: OFFSET_END}, {0: 8, 1: 25, 2: OFFSET_END}
    )
    assert ranges == [PartitionRange(0, 3, 8), PartitionRange(1, 20, 20), PartitionRange(2, 0, 0)]


def test_an_open_ended_time_range_starts_at_the_low_or_ends_at_the_high_watermark() -> None:
    assert resolve_time_range(WATERMARKS, None, {0: 4, 1: 9, 2: OFFSET_END}) == [
        PartitionRange(0, 0, 4),
        PartitionRange(1, 5, 9),
        PartitionRange(2, 0, 0),
    ]
    assert resolve_time_range(WATERMARKS, {0: 4, 1: 2, 2: OFFSET_END}, None) == [
        PartitionRange(0, 4, 10),
        PartitionRange(1, 5, 20),
        PartitionRange(2, 0, 0),
    ]


def test_the_event_count_is_the_sum_of_range_lengths() -> None:
    snapshot = Snapshot("t", (PartitionRange(0, 3, 8), PartitionRange(1, 20, 20)))
    assert snapshot.event_count == 5


@pytest.mark.parametrize(
    ("available", "limit", "expected"),
    [
        ({0: 100, 1: 100, 2: 100}, 30, {0: 10, 1: 10, 2: 10}),
        ({0: 1, 1: 1000, 2: 0}, 200, {0: 1, 1: 199, 2: 0}),
        ({0: 3, 1: 4}, 200, {0: 3, 1: 4}),
        ({0: 50, 1: 50, 2: 50}, 4, {0: 2, 1: 1, 2: 1}),
        ({0: 0}, 200, {0: 0}),
    ],
)
def test_sample_quotas_spread_the_limit_over_partitions(
    available: dict[int, int], limit: int, expected: dict[int, int]
) -> None:
    quota = sample_quota(available, limit)
    assert quota == expected
    assert sum(quota.values()) == min(limit, sum(available.values()))


def test_epoch_ms_reads_naive_times_as_utc_and_refuses_times_before_1970() -> None:
    moment = datetime(2024, 1, 1, 12, tzinfo=UTC)
    assert epoch_ms(moment) == 1_704_110_400_000
    assert epoch_ms(moment.replace(tzinfo=None)) == 1_704_110_400_000
    assert epoch_ms(moment.astimezone(timezone(timedelta(hours=2)))) == 1_704_110_400_000
    # Kafka time is in whole ms: a bound between two ms selects from the next one.
    assert epoch_ms(moment + timedelta(microseconds=1)) == 1_704_110_400_001
    assert epoch_ms(moment + timedelta(microseconds=1000)) == 1_704_110_400_001
    with pytest.raises(SnapshotError, match="before 1970"):
        epoch_ms(datetime(1969, 12, 31, tzinfo=UTC))
