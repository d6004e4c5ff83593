"""Kafka I/O of the demo: JSON or Avro events in (paced), outcomes a few seconds later,
predictions out."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import fastavro
import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer

from carrara.streams.client_config import consumer_config, producer_config
from carrara.streams.prediction_record import Prediction, decode_prediction
from carrara.streams.schema_registry import frame


class JsonProducer:
    """Produces JSON events keyed by entity; `on_delivery` learns where each one landed."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = Producer(producer_config(bootstrap))
        self.sent = 0
        self.failed = 0

    def send(
        self,
        topic: str,
        key: str,
        value: dict[str, Any],
        on_delivery: Callable[[int, int], None] | None = None,
    ) -> None:
        def _delivered(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                self.failed += 1
            elif on_delivery is not None:
                on_delivery(int(message.partition() or 0), int(message.offset() or 0))

        while True:
            try:
                self._producer.produce(
                    topic, key=key.encode(), value=self.encode(value), on_delivery=_delivered
                )
                break
            except BufferError:  # the local queue is full: let librdkafka send some first
                self._producer.poll(0.1)
        self.sent += 1
        self._producer.poll(0)

    def encode(self, value: dict[str, Any]) -> bytes:
        return orjson.dumps(value)

    def poll(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every event is acknowledged; raise if some could not be delivered."""
        remaining = self._producer.flush(timeout)
        if remaining or self.failed:
            raise RuntimeError(
                f"{remaining + self.failed} events could not be delivered to Kafka "
                f"(undelivered: {remaining}, failed: {self.failed})"
            )


class AvroProducer(JsonProducer):
    """Produces Avro records framed with their writer schema's id (the Confluent wire format), as
    a device with a Schema Registry serializer does; `use` moves to another writer schema."""

    def __init__(self, bootstrap: str, schema_id: int, schema: dict[str, Any]) -> None:
        super().__init__(bootstrap)
        self.use(schema_id, schema)

    def use(self, schema_id: int, schema: dict[str, Any]) -> None:
        self.schema_id = schema_id
        self._schema = fastavro.parse_schema(schema)

    def encode(self, value: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self._schema, value)
        return frame(self.schema_id, out.getvalue())


class DelayedOutcomes:
    """Outcomes (what really happened) produced `delay_s` after their events, like a bank's
    chargebacks, only faster.

    The monitor counts an outcome it reads before the prediction it is about as unmatched, and
    while it catches up on a backlog it reads topics in no particular order. So an outcome also
    waits until the monitor has counted the prediction of its event: `release(watermark)` sends
    only outcomes of events numbered below `watermark`.

    `in_flight` names the keys whose outcome is pending or was produced less than `cooldown_s`
    ago: an outcome joined by key goes to the key's latest prediction (give or take the
    monitor's clock-skew allowance), so the next event of a key waits until then.
    """

    def __init__(
        self, producer: JsonProducer, topic: str, delay_s: float, cooldown_s: float = 10.0
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.delay_s = delay_s
        self.cooldown_s = cooldown_s
        self._queue: deque[tuple[int, float, str, dict[str, Any]]] = deque()
        self._cooling: deque[tuple[float, str]] = deque()
        self.in_flight: dict[str, int] = {}  # key -> label of its pending outcome(s)
        self._counts: dict[str, int] = {}
        self.added = 0
        self.produced = 0

    def add(self, key: str, outcome: dict[str, Any], label: int) -> None:
        """Queue the outcome of the next event (events are numbered from 0 in this order)."""
        self._queue.append((self.added, time.monotonic() + self.delay_s, key, outcome))
        self.added += 1
        self.in_flight[key] = label
        self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, watermark: int) -> int:
        """Produce the due outcomes of events numbered below `watermark`; how many were sent."""
        now = time.monotonic()
        sent = 0
        while self._queue and self._queue[0][0] < watermark and self._queue[0][1] <= now:
            _, _, key, outcome = self._queue.popleft()
            self.producer.send(self.topic, key, outcome)
            self._cooling.append((now + self.cooldown_s, key))
            sent += 1
        while self._cooling and self._cooling[0][0] <= now:
            _, key = self._cooling.popleft()
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]
                del self.in_flight[key]
        self.produced += sent
        return sent

    @property
    def pending(self) -> int:
        return len(self._queue)


class PredictionReader:
    """Reads a deployment's output topic from the beginning in a background thread."""

    def __init__(self, bootstrap: str, topic: str, deployment: str) -> None:
        self.topic = topic
        self.deployment = deployment
        group = f"carrara-demo-reader-{uuid.uuid4().hex[:8]}"
        self._consumer = Consumer({**consumer_config(bootstrap, group), "fetch.min.bytes": 1})
        self._consumer.subscribe([topic])
        self._lock = threading.Lock()
        self._new: list[Prediction] = []
        self.served: set[tuple[int, int]] = set()
        self.shadowed: set[tuple[int, int]] = set()
        self.undecodable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = []
                for message in self._consumer.consume(500, timeout=0.2):
                    if message.error() is not None:
                        continue
                    try:
                        prediction = decode_prediction(message.value() or b"")
                    except Exception:
                        self.undecodable += 1
                        continue
                    if prediction.deployment == self.deployment:
                        batch.append(prediction)
                if batch:
                    with self._lock:
                        for p in batch:
                            (self.shadowed if p.shadow else self.served).add(
                                (p.partition, p.offset)
                            )
                        self._new.extend(batch)
        finally:
            self._consumer.close()

    def drain(self) -> list[Prediction]:
        """Predictions read since the previous call."""
        with self._lock:
            new, self._new = self._new, []
        return new

    def wait_for(
        self, served: int, shadowed: int, timeout: float, on_progress: Callable[[], None]
    ) -> bool:
        """Wait until `served` and `shadowed` distinct events have predictions; True if they do."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            on_progress()
            with self._lock:
                if len(self.served) >= served and len(self.shadowed) >= shadowed:
                    return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Pacer:
    """How many events to send now to keep `rate` per second (no burst after a stall)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._last = time.monotonic()
        self._credit = 0.0

    def due(self) -> int:
        now = time.monotonic()
        self._credit = min(self._credit + (now - self._last) * self.rate, self.rate)
        self._last = now
        count = int(self._credit)
        self._credit -= count
        return count
