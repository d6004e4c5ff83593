"""One deployment's consume -> score -> produce loop, in its own thread.

Delivery modes:
- exactly once (default): each micro-batch's predictions, dead letters and input offsets are
  committed in one Kafka transaction (`send_offsets_to_transaction`); a crash before the commit
  aborts everything, and the batch is consumed again by whoever owns the partitions next.
- at least once: outputs are produced and flushed, and the input offsets are committed only after
  every output was acknowledged.

The serving state (models, splitter) is swapped by the reconciler and read once per batch, so a
model change happens between two micro-batches, never inside one. SIGTERM sets `stop`: the loop
finishes and commits the batch in hand, then closes the consumer (leaving the group at once).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from carrara.scoring import metrics
from carrara.scoring.batch import BatchResult, InputEvent, ServingState, score_batch
from carrara.settings import Settings
from carrara.streams.client_config import admin_config, consumer_config, producer_config

log = structlog.get_logger(__name__)


def dead_letter_topic(input_topic: str) -> str:
    """Where a deployment's bad events go: next to its input topic."""
    return f"{input_topic}.dead-letters"


def group_id(deployment: str) -> str:
    return f"carrara-scorer.{deployment}"


class DeploymentRunner:
    def __init__(self, state: ServingState, settings: Settings, instance_id: str) -> None:
        self.name = state.deployment.name
        self.input_topic = state.deployment.input_topic or ""
        self.settings = settings
        self.instance_id = instance_id
        self.exactly_once = settings.scorer_delivery == "exactly_once"
        self._state = state
        self._next_state: ServingState | None = None
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        self.events_scored = 0
        self.dead_letters = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"scorer-{self.name}", daemon=True)
        metrics.REVISION.labels(self.name).set(state.deployment.revision)

    # --- control (called from the reconciler thread) -------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def swap(self, state: ServingState) -> None:
        """Serve `state` from the next micro-batch on."""
        with self._lock:
            self._next_state = state

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def served_revision(self) -> int:
        with self._lock:
            pending = self._next_state
        return (pending or self._state).deployment.revision

    @property
    def state(self) -> ServingState:
        return self._state

    # --- the loop -------------------------------------------------------------------------------

    def _consumer(self) -> Consumer:
        s = self.settings
        config: dict[str, Any] = {
            # A killed scorer's partitions move to the others after this long.
            "session.timeout.ms": s.scorer_session_timeout_ms,
            "heartbeat.interval.ms": max(1000, s.scorer_session_timeout_ms // 5),
            "fetch.min.bytes": 1,
            "fetch.wait.max.ms": s.scorer_batch_ms,
        }
        if s.scorer_static_membership:
            # A restarted instance (same id) gets its partitions back without a rebalance.
            config["group.instance.id"] = f"{self.instance_id}.{self.name}"[:249]
        return Consumer(consumer_config(s.kafka_bootstrap, group_id(self.name), **config))

    def _producer(self) -> Producer:
        config: dict[str, Any] = {"linger.ms": 2}
        if self.exactly_once:
            config["transactional.id"] = f"carrara-scorer.{self.name}.{self.instance_id}"[:249]
        return Producer(producer_config(self.settings.kafka_bootstrap, **config))

    def _run(self) -> None:
        consumer = self._consumer()
        producer = self._producer()
        try:
            if self.exactly_once:
                producer.init_transactions(30)
            consumer.subscribe([self.input_topic], on_assign=self._on_assign)
            last_lag = 0.0
            while not self.stop_event.is_set():
                batch = self._collect(consumer)
                if batch:
                    self._process(batch, consumer, producer)
                if time.monotonic() - last_lag > 5:
                    last_lag = time.monotonic()
                    self._report_lag(consumer)
        except Exception as exc:  # a fatal client error: report it; the process supervisor restarts
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("deployment runner failed", deployment=self.name)
        finally:
            producer.flush(10)
            consumer.close()  # leaves the group now, so partitions move without waiting

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions this deployment never committed start at the deployment's publication.

        A new deployment scores the events produced since it was deployed: not the topic's whole
        history (`earliest`), and not only what arrives after the scorer joins (`latest`, which
        would skip the events produced in between).
        """
        try:
            committed = consumer.committed(partitions, timeout=10)
            fresh = [tp for tp in committed if tp.offset < 0]
            if fresh:
                since_ms = int(self._state.deployment.published_at.timestamp() * 1000)
                start = self._offsets_since(fresh, since_ms)
                for tp in partitions:
                    offset = start.get((tp.topic, tp.partition))
                    if offset is not None:
                        # No event at or after that time yet: start at the end.
                        tp.offset = offset if offset >= 0 else OFFSET_END
        except KafkaException as exc:
            log.warning("could not position new partitions; using earliest", error=str(exc))
        # The consumer uses the cooperative-sticky protocol (client_config): assign incrementally.
        consumer.incremental_assign(partitions)

    def _offsets_since(
        self, partitions: list[TopicPartition], since_ms: int
    ) -> dict[tuple[str, int], int]:
        """First offset at or after `since_ms` per partition (-1: none yet), via the admin API."""
        admin = AdminClient(admin_config(self.settings.kafka_bootstrap))
        futures = admin.list_offsets(
            {
                TopicPartition(tp.topic, tp.partition): OffsetSpec.for_timestamp(since_ms)
                for tp in partitions
            },
            request_timeout=10,
        )
        return {
            (tp.topic, tp.partition): future.result(timeout=15).offset
            for tp, future in futures.items()
        }

    def _collect(self, consumer: Consumer) -> list[Message]:
        """Up to `scorer_batch_size` messages: wait briefly for the first, then `scorer_batch_ms`.

        `consume(n, timeout)` returns early only when n messages are there, so the window is
        bounded explicitly (measured: a 50 ms floor per call otherwise raised p50 latency).
        """
        size, window = self.settings.scorer_batch_size, self.settings.scorer_batch_ms / 1000
        messages = self._good(consumer.consume(size, timeout=0.1))
        if not messages:
            return messages
        deadline = time.monotonic() + window
        while len(messages) < size and not self.stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            messages.extend(self._good(consumer.consume(size - len(messages), timeout=remaining)))
        return messages

    def _good(self, polled: list[Message]) -> list[Message]:
        good = []
        for message in polled:
            error = message.error()
            if error is None:
                good.append(message)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", deployment=self.name, error=str(error))
        return good

    def _current(self) -> ServingState:
        with self._lock:
            if self._next_state is not None:
                self._state, self._next_state = self._next_state, None
                metrics.REVISION.labels(self.name).set(self._state.deployment.revision)
                log.info(
                    "serving revision",
                    deployment=self.name,
                    revision=self._state.deployment.revision,
                )
            return self._state

    def _process(self, batch: list[Message], consumer: Consumer, producer: Producer) -> None:
        started = time.perf_counter()
        state = self._current()
        events = [
            InputEvent(
                key=m.key(),
                value=m.value(),
                headers=m.headers(),
                topic=m.topic(),
                partition=m.partition(),
                offset=m.offset(),
                timestamp_ms=m.timestamp()[1],
            )
            for m in batch
        ]
        result = score_batch(state, events)
        offsets = _next_offsets(batch)
        try:
            if self.exactly_once:
                self._deliver_transactionally(result, offsets, consumer, producer)
            else:
                self._deliver_at_least_once(result, offsets, consumer, producer)
        except KafkaException as exc:
            log.warning(
                "delivery failed; the batch will be consumed again",
                deployment=self.name,
                error=str(exc),
            )
            self._rewind(consumer, batch)
            return
        self._count(result, len(batch), time.perf_counter() - started)

    def _deliver_transactionally(
        self,
        result: BatchResult,
        offsets: list[TopicPartition],
        consumer: Consumer,
        producer: Producer,
    ) -> None:
        producer.begin_transaction()
        try:
            for record in result.records:
                _produce(producer, record.topic, record.key, record.value, record.headers)
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            producer.commit_transaction(60)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if error is not None and getattr(error, "fatal", lambda: False)():
                raise RuntimeError(f"fatal producer error (fenced?): {error}") from exc
            try:
                producer.abort_transaction(30)
            except KafkaException:
                log.exception("abort failed", deployment=self.name)
            raise

    def _deliver_at_least_once(
        self,
        result: BatchResult,
        offsets: list[TopicPartition],
        consumer: Consumer,
        producer: Producer,
    ) -> None:
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for record in result.records:
            _produce(producer, record.topic, record.key, record.value, record.headers, on_delivery)
        remaining = producer.flush(60)
        if remaining or failures:
            raise KafkaException(
                KafkaError(KafkaError._MSG_TIMED_OUT, f"{remaining} undelivered, {failures[:3]}")
            )
        consumer.commit(offsets=offsets, asynchronous=False)

    def _rewind(self, consumer: Consumer, batch: list[Message]) -> None:
        """Seek back to the first offset of the batch per partition, to process it again."""
        first: dict[tuple[str, int], int] = {}
        for m in batch:
            position = (m.topic(), m.partition())
            first[position] = min(first.get(position, m.offset()), m.offset())
        for (topic, partition), offset in first.items():
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException:
                log.warning("seek failed (partition revoked?)", partition=partition)

    def _count(self, result: BatchResult, consumed: int, seconds: float) -> None:
        metrics.EVENTS_IN.labels(self.name).inc(consumed)
        metrics.BATCH_SECONDS.labels(self.name).observe(seconds)
        for variant, count in result.served.items():
            metrics.PREDICTIONS.labels(self.name, variant, "false").inc(count)
        for variant, count in result.shadowed.items():
            metrics.PREDICTIONS.labels(self.name, variant, "true").inc(count)
        for error_class, count in result.dead_letters.items():
            metrics.DEAD_LETTERS.labels(self.name, error_class).inc(count)
        if result.keyless:
            metrics.KEYLESS.labels(self.name).inc(result.keyless)
        self.events_scored += sum(result.served.values())
        self.dead_letters += sum(result.dead_letters.values())

    def _report_lag(self, consumer: Consumer) -> None:
        try:
            for tp in consumer.position(consumer.assignment()):
                if tp.offset < 0:
                    continue
                high = consumer.get_watermark_offsets(tp, timeout=1, cached=True)[1]
                metrics.CONSUMER_LAG.labels(self.name, str(tp.partition)).set(
                    max(0, high - tp.offset)
                )
        except KafkaException:
            pass


def _next_offsets(batch: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in batch:
        position = (m.topic(), m.partition())
        last[position] = max(last.get(position, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def _produce(
    producer: Producer, topic: str, key: Any, value: Any, headers: Any, callback: Any = None
) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers, on_delivery=callback)
            return
        except BufferError:  # the local queue is full: let it drain, then retry
            producer.poll(0.05)
