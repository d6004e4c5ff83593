"""Delivering one scored micro-batch to Kafka, in either delivery mode, through a broker outage.

- exactly once: the batch's predictions, dead letters and input offsets are committed in one
  Kafka transaction. A retriable error (broker unreachable, request timed out) retries the same
  step with backoff; an abortable error aborts the transaction and rewinds the consumer to the
  last committed offsets, so the batch is scored again; a fatal error (fenced, transactional state
  lost) or a call that hangs past its deadline raises `ClientBroken`: the runner rebuilds both
  clients and resumes from the committed offsets.
- at least once: outputs are produced and flushed (with a deadline), and the input offsets are
  committed only after every output was acknowledged; a failure rewinds to the batch's first
  offsets and the batch is delivered again (duplicates are allowed in this mode, losses are not).

Every blocking call has a deadline (`CallGuard`); none waits forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from carrara.scoring.batch import OutputRecord
from carrara.streams.consumed import position
from carrara.streams.resilience import (
    Backoff,
    CallGuard,
    ClientBroken,
    ClientHung,
    LoopHealth,
    classify,
)

log = structlog.get_logger(__name__)


class Redeliver(Exception):
    """The batch was not delivered and the consumer was rewound: score it again."""


class Delivery:
    """Delivers batches for one runner with its current consumer and producer."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        producer: Producer,
        guard: CallGuard,
        health: LoopHealth,
        exactly_once: bool,
        call_timeout_s: float,
        stop: Callable[[], bool],
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.guard = guard
        self.health = health
        self.exactly_once = exactly_once
        self.call_timeout_s = call_timeout_s
        self.stop = stop

    def deliver(self, records: list[OutputRecord], batch: list[Message]) -> None:
        """Deliver `records` and commit `batch`'s offsets; `Redeliver` or `ClientBroken` if not."""
        offsets = next_offsets(batch)
        try:
            if self.exactly_once:
                self._transaction(records, offsets, batch)
            else:
                self._at_least_once(records, offsets, batch)
        except ClientHung as exc:
            self.health.trouble(str(exc), "rebuilt clients")
            raise ClientBroken(str(exc)) from exc

    # --- exactly once -------------------------------------------------------------------------

    def _transaction(
        self, records: list[OutputRecord], offsets: list[TopicPartition], batch: list[Message]
    ) -> None:
        producer = self.producer
        try:
            producer.begin_transaction()
            self._produce_all(records, None)
            metadata = self.consumer.consumer_group_metadata()
            self._with_retries(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(
                    offsets, metadata, self.call_timeout_s
                ),
            )
            self._with_retries(
                "commit_transaction", lambda: producer.commit_transaction(self.call_timeout_s)
            )
        except (KafkaException, _QueueFull) as exc:
            remedy = "abort" if isinstance(exc, _QueueFull) else classify(exc)
            if remedy == "fatal" or remedy == "fail":
                self.health.trouble(f"producer: {exc}", "rebuilt clients")
                raise ClientBroken(f"transactional producer unusable: {exc}") from exc
            self._abort(str(exc))
            self.rewind_to_committed(batch)
            raise Redeliver(str(exc)) from exc

    def _with_retries(self, what: str, call: Callable[[], None]) -> None:
        """Retry a transactional step on retriable errors (the API allows calling it again)."""
        backoff = Backoff(initial_s=0.2, cap_s=5.0)
        deadline = time.monotonic() + 4 * self.call_timeout_s
        while True:
            try:
                self.guard.call(what, call, deadline_s=self.call_timeout_s + 5)
                return
            except KafkaException as exc:
                if classify(exc) != "retry" or time.monotonic() > deadline or self.stop():
                    raise
                self.health.trouble(f"{what}: {exc}", f"retried {what}")
                time.sleep(backoff.next_delay())

    def _abort(self, reason: str) -> None:
        try:
            self.guard.call(
                "abort_transaction",
                self.producer.abort_transaction,
                self.call_timeout_s,
                deadline_s=self.call_timeout_s + 5,
            )
        except KafkaException as exc:
            self.health.trouble(f"abort failed: {exc}", "rebuilt clients")
            raise ClientBroken(f"could not abort the transaction: {exc}") from exc
        self.health.trouble(reason, "aborted a transaction")

    # --- at least once ------------------------------------------------------------------------

    def _at_least_once(
        self, records: list[OutputRecord], offsets: list[TopicPartition], batch: list[Message]
    ) -> None:
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        try:
            self._produce_all(records, on_delivery)
        except _QueueFull as exc:
            failures.append(str(exc))
        remaining = self.guard.call(
            "flush", self.producer.flush, self.call_timeout_s, deadline_s=self.call_timeout_s + 5
        )
        if remaining or failures:
            reason = f"{remaining} outputs unacknowledged, {failures[:3]}"
            self.health.trouble(reason, "redelivered a batch")
            self.rewind(batch)
            raise Redeliver(reason)
        try:
            self.guard.call(
                "commit",
                lambda: self.consumer.commit(offsets=offsets, asynchronous=False),
                deadline_s=self.call_timeout_s,
            )
        except KafkaException as exc:
            # The outputs are delivered; the next batch's commit covers these offsets too. If the
            # process dies first, the batch is delivered again (at least once).
            self.health.trouble(f"commit: {exc}", "commit deferred")

    # --- shared -------------------------------------------------------------------------------

    def _produce_all(self, records: list[OutputRecord], callback: Any) -> None:
        """Queue every record; a local queue that stays full past the deadline fails the batch."""
        producer = self.producer
        deadline = time.monotonic() + self.call_timeout_s
        for record in records:
            while True:
                try:
                    producer.produce(
                        record.topic,
                        key=record.key,
                        value=record.value,
                        headers=record.headers,
                        on_delivery=callback,
                    )
                    break
                except BufferError:  # the local queue is full: let it drain, then retry
                    if time.monotonic() > deadline or self.stop():
                        raise _QueueFull("the producer queue stayed full") from None
                    producer.poll(0.05)

    def rewind_to_committed(self, batch: list[Message]) -> None:
        """Seek the batch's partitions back to their last committed offsets.

        In exactly-once mode those equal the batch's first offsets (each batch commits before the
        next is read), which is the fallback when the coordinator cannot be asked.
        """
        partitions = sorted({position(m)[:2] for m in batch})
        try:
            committed = self.guard.call(
                "committed",
                self.consumer.committed,
                [TopicPartition(t, p) for t, p in partitions],
                self.call_timeout_s,
                deadline_s=self.call_timeout_s + 5,
            )
        except KafkaException as exc:
            log.info("committed offsets unavailable; rewinding to the batch start", error=str(exc))
            self.rewind(batch)
            return
        first = first_offsets(batch)
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else first[(tp.topic, tp.partition)]
            self._seek(TopicPartition(tp.topic, tp.partition, offset))
        self.health.trouble("rewound to the committed offsets", "rewound")

    def rewind(self, batch: list[Message]) -> None:
        """Seek back to the first offset of the batch per partition, to process it again."""
        for (topic, partition), offset in first_offsets(batch).items():
            self._seek(TopicPartition(topic, partition, offset))

    def _seek(self, tp: TopicPartition) -> None:
        try:
            self.consumer.seek(tp)
        except KafkaException:
            # Revoked meanwhile: its next owner resumes from the committed offset.
            log.info("seek failed (partition revoked?)", partition=tp.partition)


class _QueueFull(Exception):
    pass


def first_offsets(batch: list[Message]) -> dict[tuple[str, int], int]:
    first: dict[tuple[str, int], int] = {}
    for m in batch:
        position = (str(m.topic()), int(m.partition() or 0))
        offset = int(m.offset() or 0)
        first[position] = min(first.get(position, offset), offset)
    return first


def next_offsets(batch: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in batch:
        position = (str(m.topic()), int(m.partition() or 0))
        last[position] = max(last.get(position, -1), int(m.offset() or 0))
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
