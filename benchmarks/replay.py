"""Replay + decode into the training matrix vs. a raw consume-only loop over the same snapshot.

Produces N synthetic events (entity key, 20 float features, a 0/1 label; ~320 bytes of JSON) to a
fresh 3-partition topic, snapshots it, then alternates, in the same run and with the same client
settings, (a) a consume-only loop over the snapshot's offsets and (b) `replay_snapshot` decoded by
`EventDecoder` into the matrix (holdout, feature spec, labels included). Prints events/s of both
and their ratio (target: >= 0.7x raw). The topic is deleted at the end.

    .venv/bin/python benchmarks/replay.py [--events 500000] [--rounds 5]
                                          [--fetch-queue-backoff-ms N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from results_md import write_section

from carrara.settings import Settings
from carrara.streams.client_config import producer_config
from carrara.streams.event_codec import EventDecoder, fit_feature_spec
from carrara.streams.replay import replay_config, replay_snapshot, snapshot_event_count
from carrara.streams.snapshot import PartitionRange, SnapshotMode, snapshot_offsets
from carrara.streams.topics import TopicAdmin
from carrara.training.holdout import holdout_mask

FEATURES = 20
ENTITIES = 10_000
SCHEMA = {
    "key_field": "entity",
    "label_field": "label",
    "task": "binary",
    "features": [{"name": f"f{i}", "type": "float"} for i in range(FEATURES)],
}


def produce(bootstrap: str, topic: str, events: int) -> int:
    """Write `events` synthetic events; returns the mean value size in bytes."""
    producer = Producer(producer_config(bootstrap))
    rng = random.Random(7)  # noqa: S311 - reproducible synthetic data, not security
    size = 0
    for i in range(events):
        features = {f"f{j}": round(rng.random(), 6) for j in range(FEATURES)}
        value = orjson.dumps(
            {"entity": f"e-{i % ENTITIES}", **features, "label": int(features["f0"] > 0.5)}
        )
        size += len(value)
        while True:
            try:
                producer.produce(topic, value=value, key=f"e-{i % ENTITIES}")
                break
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain it
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("not every event was delivered")
    return size // max(events, 1)


def raw_consume(
    bootstrap: str, topic: str, ranges: list[PartitionRange], config: dict[str, Any]
) -> int:
    """The baseline: consume the snapshot's offsets with the replay's settings, doing nothing."""
    consumer = Consumer(replay_config(bootstrap, **config))
    ends = {r.partition: r.end for r in ranges if r.count}
    consumer.assign([TopicPartition(topic, r.partition, r.start) for r in ranges if r.count])
    count = 0
    try:
        while ends:
            messages = consumer.consume(num_messages=1000, timeout=0.5)
            # As tight as a consumer loop gets: look at single records only for end events.
            if any(map(Message.error, messages)):
                for msg in messages:
                    error = msg.error()
                    if error is None:
                        count += 1
                    elif error.code() == KafkaError._PARTITION_EOF:
                        ends.pop(msg.partition(), None)
                    else:
                        raise RuntimeError(error.str())
            else:
                count += len(messages)
    finally:
        consumer.close()
    return count


def replay_and_decode(
    bootstrap: str, topic: str, ranges: list[PartitionRange], config: dict[str, Any]
) -> int:
    """The measured path: replay, decode, holdout, feature spec, matrix and labels."""
    decoder = EventDecoder(SCHEMA, expected_rows=snapshot_event_count(ranges))
    for values, partitions, offsets in replay_snapshot(bootstrap, topic, ranges, config=config):
        decoder.add_batch(values, partitions, offsets)
    decoded = decoder.result()
    holdout = holdout_mask({"by": "key", "fraction": 0.2}, keys=decoded.keys)
    spec = fit_feature_spec(decoded, ~holdout)
    matrix = spec.transform(decoded)
    labels = spec.encode_labels(decoded)
    if matrix.shape != (decoded.rows, FEATURES) or labels is None or decoded.bad.count:
        raise RuntimeError(f"unexpected result: {matrix.shape}, bad events {decoded.bad.samples}")
    return decoded.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bootstrap", default=Settings().kafka_bootstrap)
    parser.add_argument(
        "--fetch-queue-backoff-ms",
        type=int,
        default=None,
        help="override the replay's librdkafka fetch.queue.backoff.ms (1000 = librdkafka default)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    load_before = os.getloadavg()
    begun = time.monotonic()
    config: dict[str, Any] = {}
    if args.fetch_queue_backoff_ms is not None:
        config["fetch.queue.backoff.ms"] = args.fetch_queue_backoff_ms

    topic = f"bench-replay-{uuid.uuid4().hex[:8]}"
    admin = TopicAdmin(args.bootstrap)
    admin.create_topic(topic, partitions=3)
    try:
        started = time.perf_counter()
        size = produce(args.bootstrap, topic, args.events)
        print(
            f"produced {args.events} events (~{size} bytes each) to {topic} "
            f"in {time.perf_counter() - started:.1f}s"
        )
        ranges = list(snapshot_offsets(args.bootstrap, topic, SnapshotMode.latest).ranges)
        print("snapshot:", [r.as_dict() for r in ranges])
        rates: dict[str, list[float]] = {"raw consume": [], "replay + decode": []}
        for round_ in range(1, args.rounds + 1):
            for name, run in (("raw consume", raw_consume), ("replay + decode", replay_and_decode)):
                started = time.perf_counter()
                count = run(args.bootstrap, topic, ranges, config)
                elapsed = time.perf_counter() - started
                if count != args.events:
                    raise RuntimeError(f"{name} read {count} events, expected {args.events}")
                rates[name].append(count / elapsed)
                print(f"round {round_}: {name:16} {count / elapsed:>10,.0f} events/s")
        raw = statistics.median(rates["raw consume"])
        replay = statistics.median(rates["replay + decode"])
        print(f"median raw consume:     {raw:>10,.0f} events/s")
        print(f"median replay + decode: {replay:>10,.0f} events/s")
        print(f"ratio: {replay / raw:.2f}x raw consume (target >= 0.7x)")
    finally:
        admin.delete_topics([topic])
    if args.no_write:
        return
    section = render(args, rates, size, load_before, os.getloadavg(), time.monotonic() - begun)
    write_section(Path(__file__).resolve().parent / "RESULTS.md", "replay", "replay.py", section)


HEADING = "## Replay + decode vs. raw consume"


def render(
    args: argparse.Namespace,
    rates: dict[str, list[float]],
    size: int,
    before: tuple[float, ...],
    after: tuple[float, ...],
    elapsed: float,
) -> str:
    """The section of RESULTS.md: per-round rates, medians with min-max, the ratio."""
    raw, replay = rates["raw consume"], rates["replay + decode"]
    ratios = [r / c for r, c in zip(replay, raw, strict=True)]
    command = ".venv/bin/python benchmarks/replay.py"
    if args.events != 500_000 or args.rounds != 5:
        command += f" --events {args.events} --rounds {args.rounds}"
    if args.fetch_queue_backoff_ms is not None:
        command += f" --fetch-queue-backoff-ms {args.fetch_queue_backoff_ms}"

    def span(values: list[float], one: Any) -> str:
        return f"{one(statistics.median(values))} ({one(min(values))}-{one(max(values))})"

    rows = "\n".join(
        f"| {i} | {c:,.0f} | {r:,.0f} | {r / c:.2f}x |"
        for i, (c, r) in enumerate(zip(raw, replay, strict=True), start=1)
    )
    return f"""{HEADING} (`benchmarks/replay.py`)

```
{command}
```

Written by the script on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores, shared
with the local stack (the broker runs on the same cores) and anything else running (load average
{before[0]:.1f} before, {after[0]:.1f} after); {elapsed:.0f} s. {args.events:,} synthetic events
(entity key, 20 float features, 0/1 label; ~{size} bytes of JSON each) on a fresh 3-partition
topic, snapshotted; per round, alternating: (a) a consume-only loop over the snapshot's offsets
(`consume(num_messages=1000)`, counting records) and (b) `replay_snapshot` + `EventDecoder` into
the float64 matrix, plus the key holdout, `fit_feature_spec`, `transform` and `encode_labels`.
Same client settings (`replay_config`) for both.

| round | raw consume, events/s | replay + decode into the matrix, events/s | ratio |
|---|---|---|---|
{rows}

Medians of {len(raw)} rounds (min-max): raw consume {span(raw, lambda v: f"{v:,.0f}")} events/s,
replay + decode {span(replay, lambda v: f"{v:,.0f}")} events/s, ratio
{span(ratios, lambda v: f"{v:.2f}x")} (target >= 0.7x).
"""


if __name__ == "__main__":
    main()
