"""The end-to-end latency probe of `benchmarks/scorer.py`: an open-loop paced producer and a
read_committed reader in its own process.

"Input produced -> prediction readable by a read_committed consumer", per event:
- the producer stamps each input record's CreateTime with its wall-clock send time (the scorer's
  own end-to-end histogram starts from that timestamp too) and keeps the exact (sub-millisecond)
  send time per (partition, offset) from the delivery reports;
- the reader (a separate process, so the producer never holds its GIL) blocks in `poll()` until
  one record is there, notes the wall-clock time at once, then drains what is already queued
  with `consume(n, timeout=0)`: it never waits for a batch to fill (`consume(1000, 0.2)` would add
  up to 200 ms to the figure it measures). Fetches: `fetch.min.bytes` 1, `fetch.wait.max.ms` 5.
Latency = receive time - send time, same host, same clock.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from carrara.streams.client_config import connection_config, producer_config


def reader_main(conn: Connection, bootstrap: str, topic: str, partitions: int, group: str) -> None:
    """Read `topic` (read_committed) until told to stop; on "collect", send what arrived since."""
    from carrara.streams.prediction_record import decode_prediction

    consumer = Consumer(
        {
            **connection_config(bootstrap),
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.min.bytes": 1,
            "fetch.wait.max.ms": 5,
            "fetch.queue.backoff.ms": 1,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    values: list[bytes] = []
    received: list[float] = []
    conn.send("ready")
    while True:
        first = consumer.poll(0.02)
        if first is not None:
            now = time.time()
            for m in (first, *consumer.consume(100_000, timeout=0)):
                if m.error() is None:
                    values.append(m.value())
                    received.append(now)
        if conn.poll():
            if conn.recv() == "stop":
                break
            # Decoding waits until asked, so it never delays the next receive time.
            decoded = [decode_prediction(v) for v in values]
            conn.send(
                {
                    "partition": np.fromiter(
                        (p.partition for p in decoded), np.int32, len(decoded)
                    ),
                    "offset": np.fromiter((p.offset for p in decoded), np.int64, len(decoded)),
                    "revision": np.fromiter((p.revision for p in decoded), np.int32, len(decoded)),
                    "received": np.asarray(received, dtype=np.float64),
                }
            )
            values, received = [], []
    consumer.close()


@dataclass
class Records:
    """Predictions the reader received: source position, revision, receive time (s)."""

    partition: np.ndarray
    offset: np.ndarray
    revision: np.ndarray
    received: np.ndarray

    @staticmethod
    def join(parts: list[dict[str, np.ndarray]]) -> Records:
        keys = ("partition", "offset", "revision", "received")
        if not parts:
            return Records(*(np.empty(0) for _ in keys))
        return Records(*(np.concatenate([p[k] for p in parts]) for k in keys))


class Probe:
    """A paced producer into `source` and a read_committed reader of `target`."""

    def __init__(self, bootstrap: str, source: str, target: str, partitions: int, run_id: str):
        self.source, self.partitions = source, partitions
        # linger 1 ms: what a latency-minded producer would use; it is part of the figure.
        self.producer = Producer(producer_config(bootstrap, **{"linger.ms": 1}))
        self.sent: dict[tuple[int, int], float] = {}  # (partition, offset) -> send time (s)
        self.failed = 0
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        group = f"bench-{run_id}-probe-{uuid.uuid4().hex[:8]}"
        self.reader = ctx.Process(
            target=reader_main, args=(child, bootstrap, target, partitions, group), daemon=True
        )
        self.reader.start()
        if not self.conn.poll(60) or self.conn.recv() != "ready":
            raise RuntimeError("the probe's reader did not start")

    def _delivered(self, sent: float, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.sent[(message.partition(), message.offset())] = sent
        else:
            self.failed += 1

    def collect(self) -> Records:
        self.conn.send("collect")
        return Records.join([self.conn.recv()])

    def send(
        self,
        values: list[tuple[bytes, bytes]],
        rate: float,
        seconds: float,
        at: dict[float, Callable[[], Any]] | None = None,
    ) -> tuple[list[float], float]:
        """Open loop: event i is due at start + i/rate, whatever the scorer does. Calls each
        `at[t]` once when t seconds have passed. Returns the send times and the largest lag
        behind schedule (s)."""
        hooks = sorted((at or {}).items())
        total = max(1, int(rate * seconds))
        send_times: list[float] = []
        lag = 0.0
        start = time.perf_counter()
        i = 0
        while i < total:
            now = time.perf_counter()
            while hooks and now - start >= hooks[0][0]:
                hooks.pop(0)[1]()
            due = min(total, int((now - start) * rate) + 1)
            lag = max(lag, now - start - i / rate)
            while i < due:
                key, value = values[i % len(values)]
                sent = time.time()
                try:
                    self.producer.produce(
                        self.source,
                        key=key,
                        value=value,
                        timestamp=int(sent * 1000),
                        on_delivery=partial(self._delivered, sent),
                    )
                except BufferError:
                    self.producer.poll(0.001)
                    continue
                send_times.append(sent)
                i += 1
            self.producer.poll(0)
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        for hook in hooks:
            hook[1]()
        if self.producer.flush(60) != 0 or self.failed:
            raise RuntimeError(f"{self.failed} probe events were not delivered")
        return send_times, lag

    def wait_for(
        self, positions: set[tuple[int, int]], timeout: float = 60, strict: bool = True
    ) -> Records:
        """Collect until every (partition, offset) of `positions` has a prediction (or, unless
        `strict`, the timeout passed: the caller counts what is missing)."""
        parts: list[Records] = []
        missing = set(positions)
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            time.sleep(0.1)
            got = self.collect()
            parts.append(got)
            missing.difference_update(zip(got.partition.tolist(), got.offset.tolist(), strict=True))
        if missing and strict:
            raise RuntimeError(f"{len(missing)} probe events got no prediction in {timeout}s")
        return Records(
            *(np.concatenate([getattr(p, k) for p in parts]) for k in Records.__annotations__)
        )

    def warm(self, values: list[tuple[bytes, bytes]], timeout: float = 90) -> None:
        """Send ~100 events/s until predictions arrive from every partition (runner joined)."""
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        while len(seen) < self.partitions:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no predictions from {self.source} in {timeout}s")
            self.send(values, 100, 0.5)
            seen.update(self.collect().partition.tolist())
        time.sleep(0.5)
        self.collect()
        self.sent.clear()

    def close(self) -> None:
        self.conn.send("stop")
        self.reader.join(10)
        if self.reader.is_alive():
            self.reader.kill()


def latencies_ms(probe: Probe, skip_before: float) -> np.ndarray:
    """Latency (ms) of each event sent at or after `skip_before` (its first prediction, should
    at-least-once repeat one); waits for all of them."""
    measured = {pos: sent for pos, sent in probe.sent.items() if sent >= skip_before}
    got = probe.wait_for(set(measured))
    first: dict[tuple[int, int], float] = {}
    for p, o, r in zip(
        got.partition.tolist(), got.offset.tolist(), got.received.tolist(), strict=True
    ):
        if (p, o) in measured and r < first.get((p, o), float("inf")):
            first[(p, o)] = r
    probe.sent.clear()
    return np.asarray([(first[pos] - sent) * 1000 for pos, sent in measured.items()])
