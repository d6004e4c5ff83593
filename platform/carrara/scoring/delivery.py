"""Delivering scored micro-batches to Kafka, in either delivery mode, through a broker outage.

A delivery is split in two so the scoring loop overlaps it with the next batch: `start` queues
the batch's records (and in exactly-once mode opens its transaction) and sends the commit to the
client's worker thread (`CallGuard.submit`); while the commit is in flight the loop consumes and
scores the next batch; `finish` then waits for the commit. Only one delivery is in flight at a
time, so outputs and offsets commit in order and neither guarantee is weakened.

- exactly once: the batch's predictions, dead letters and input offsets are committed in one
  Kafka transaction. A retriable error (broker unreachable, request timed out) retries the same
  step with backoff; an abortable error aborts the transaction and rewinds the consumer to the
  last committed offsets (the batch in flight and the one scored meanwhile are scored again);
  a fatal error (fenced, transactional state lost) or a call that hangs past its deadline raises
  `ClientBroken`: the runner rebuilds both clients and resumes from the committed offsets.
- at least once: outputs are produced and flushed (with a deadline), and the input offsets are
  committed only after every output was acknowledged; a failure rewinds to the first offsets of
  what was consumed since and it is delivered again (duplicates are allowed here, losses are not).

Every blocking call has a deadline (`CallGuard`); none waits forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from carrara.scoring.batch import OutputRecord
from carrara.streams.consumed import first_offsets, next_offsets, position
from carrara.streams.resilience import (
    Backoff,
    CallGuard,
    ClientBroken,
    ClientHung,
    LoopHealth,
    Pending,
    classify,
)

log = structlog.get_logger(__name__)


class Redeliver(Exception):
    """The batch was not delivered and the consumer was rewound: score it again."""


# At least once: how often the offsets of delivered batches are committed (at most).
ALO_COMMIT_INTERVAL_S = 0.2


class Acks:
    """One at-least-once batch's delivery reports: how many are still due, and the failures.

    Reports can be served by the worker's poll and the loop's (when the local queue is full) at
    once, so the counts are under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due = 0
        self.failures: list[str] = []

    def expect(self, count: int) -> None:
        with self._lock:
            self._due += count

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self._lock:
            self._due -= 1
            if err is not None:
                self.failures.append(str(err))

    def fail(self, reason: str) -> None:
        with self._lock:
            self.failures.append(reason)

    def outstanding(self) -> int:
        with self._lock:
            return self._due


@dataclass
class InFlight:
    """A delivery whose commit runs on the client's worker thread."""

    batch: list[Message]
    offsets: list[TopicPartition]
    commit: Pending[Any]
    stage: list[str]  # the step the worker reached (for a retry to resume there)
    failures: list[str]  # at least once: delivery reports with an error


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
        # At least once: offsets of delivered batches not committed yet (committed together at
        # most every ALO_COMMIT_INTERVAL_S: an asynchronous commit per batch queued so many
        # requests on the coordinator connection that heartbeats timed out behind them).
        self._due: dict[tuple[str, int], int] = {}
        self._last_commit = 0.0

    def deliver(self, records: list[OutputRecord], batch: list[Message]) -> None:
        """Deliver one batch and wait for its commit (`start` + `finish`)."""
        self.finish(self.start(records, batch))

    def start(
        self,
        records: list[OutputRecord],
        batch: list[Message],
        produced: Acks | None = None,
    ) -> InFlight:
        """Queue `records` and send the commit of `batch`'s offsets to the worker thread.

        `produced` (at least once): the records were already queued by `produce_now`, whose
        delivery reports that collects.
        """
        offsets = next_offsets(batch)
        try:
            if self.exactly_once:
                return self._start_transaction(records, offsets, batch)
            return self._start_at_least_once(records, offsets, batch, produced)
        except ClientHung as exc:
            self.health.trouble(str(exc), "rebuilt clients")
            raise ClientBroken(str(exc)) from exc

    def finish(self, flight: InFlight, consumed_since: Sequence[Message] = ()) -> None:
        """Wait for `flight`'s commit; on failure rewind (`Redeliver`) or rebuild (`ClientBroken`).

        `consumed_since`: messages read after `flight`'s batch and not delivered; a rewind must
        cover them too.
        """
        try:
            if self.exactly_once:
                self._finish_transaction(flight, consumed_since)
            else:
                self._finish_at_least_once(flight, consumed_since)
        except ClientHung as exc:
            self.health.trouble(str(exc), "rebuilt clients")
            raise ClientBroken(str(exc)) from exc

    # --- exactly once -------------------------------------------------------------------------

    def _start_transaction(
        self, records: list[OutputRecord], offsets: list[TopicPartition], batch: list[Message]
    ) -> InFlight:
        producer = self.producer
        metadata = self.consumer.consumer_group_metadata()
        stage = ["send_offsets_to_transaction"]
        timeout = self.call_timeout_s

        def commit() -> None:
            producer.send_offsets_to_transaction(offsets, metadata, timeout)
            stage[0] = "commit_transaction"
            producer.commit_transaction(timeout)

        try:
            producer.begin_transaction()
            self._produce_all(records, None)
            pending = self.guard.submit("commit", commit, deadline_s=2 * timeout + 5)
        except (KafkaException, _QueueFull) as exc:
            self._after_failed_transaction(exc, batch)
        return InFlight(batch, offsets, pending, stage, [])

    def _finish_transaction(self, flight: InFlight, consumed_since: Sequence[Message]) -> None:
        try:
            try:
                flight.commit.result()
            except KafkaException as exc:
                if classify(exc) != "retry":
                    raise
                self._resume_commit(flight, exc)
        except KafkaException as exc:
            self._after_failed_transaction(exc, [*flight.batch, *consumed_since])

    def _resume_commit(self, flight: InFlight, first: KafkaException) -> None:
        """Retry the transactional step that failed with a retriable error, then the rest."""
        producer, timeout = self.producer, self.call_timeout_s
        self.health.trouble(f"{flight.stage[0]}: {first}", f"retried {flight.stage[0]}")
        if flight.stage[0] == "send_offsets_to_transaction":
            metadata = self.consumer.consumer_group_metadata()
            self._with_retries(
                "send_offsets_to_transaction",
                lambda: producer.send_offsets_to_transaction(flight.offsets, metadata, timeout),
            )
        self._with_retries("commit_transaction", lambda: producer.commit_transaction(timeout))

    def _after_failed_transaction(self, exc: Exception, consumed: Sequence[Message]) -> NoReturn:
        """Abort and rewind (`Redeliver`), or give the clients up (`ClientBroken`)."""
        remedy = "abort" if isinstance(exc, _QueueFull) else classify(exc)
        if remedy in ("fatal", "fail"):
            self.health.trouble(f"producer: {exc}", "rebuilt clients")
            raise ClientBroken(f"transactional producer unusable: {exc}") from exc
        self._abort(str(exc))
        self.rewind_to_committed(consumed)
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

    def produce_now(self, records: list[OutputRecord], acks: Acks | None = None) -> Acks:
        """At least once: queue `records` now, before the previous batch's commit is done, so
        predictions are out at once; their offsets are committed later by `start(...,
        produced=acks)`. If the previous commit fails, the batch is delivered again (at least
        once allows the duplicates). Returns the batch's delivery reports."""
        assert not self.exactly_once, "a transaction's records are produced in it"
        acks = Acks() if acks is None else acks
        try:
            self._produce_all(records, acks.on_delivery, acks)
        except _QueueFull as exc:
            acks.fail(str(exc))
        return acks

    def _start_at_least_once(
        self,
        records: list[OutputRecord],
        offsets: list[TopicPartition],
        batch: list[Message],
        produced: Acks | None = None,
    ) -> InFlight:
        acks = produced if produced is not None else self.produce_now(records)
        failures = acks.failures
        producer, timeout = self.producer, self.call_timeout_s
        stage = ["flush"]

        def delivered() -> int:
            # This batch's own delivery reports, not `flush()`: the loop keeps producing the
            # next batch meanwhile, and a flush would wait for those too (under a backlog, for
            # ever). The offsets are committed by the loop itself (`_finish_at_least_once`): a
            # synchronous commit from this thread while the loop polls the consumer could hang.
            deadline = time.monotonic() + timeout
            while acks.outstanding() and time.monotonic() < deadline:
                producer.poll(0.05)
            remaining = acks.outstanding()
            return remaining or (-1 if failures else 0)

        pending = self.guard.submit("flush", delivered, deadline_s=2 * timeout + 5)
        return InFlight(batch, offsets, pending, stage, failures)

    def _finish_at_least_once(self, flight: InFlight, consumed_since: Sequence[Message]) -> None:
        remaining = flight.commit.result()
        if remaining == 0:
            flight.stage[0] = "commit"
            for tp in flight.offsets:
                self._due[(tp.topic, tp.partition)] = tp.offset
            if time.monotonic() - self._last_commit >= ALO_COMMIT_INTERVAL_S:
                self.commit_due()
            return
        reason = f"{max(remaining, 0)} outputs unacknowledged, {flight.failures[:3]}"
        self.health.trouble(reason, "redelivered a batch")
        self.rewind([*flight.batch, *consumed_since])
        raise Redeliver(reason)

    def commit_due(self, *, wait: bool = False) -> None:
        """At least once: commit the offsets of the batches delivered so far.

        Asynchronous in the loop: if it fails (a revoked partition, the coordinator away), the
        next one covers these offsets, and if the process dies first the batches are delivered
        again (at least once). `wait` (stopping): synchronously, within the call deadline.
        """
        if not self._due:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._due.items()]
        self._due.clear()
        self._last_commit = time.monotonic()
        try:
            if wait:
                consumer = self.consumer
                self.guard.call(
                    "commit",
                    lambda: consumer.commit(offsets=offsets, asynchronous=False),
                    deadline_s=self.call_timeout_s,
                )
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except (KafkaException, ClientHung) as exc:
            self.health.trouble(f"commit: {exc}", "commit deferred")

    # --- shared -------------------------------------------------------------------------------

    def _produce_all(
        self, records: list[OutputRecord], callback: Any, acks: Acks | None = None
    ) -> None:
        """Queue every record; a local queue that stays full past the deadline fails the batch."""
        producer = self.producer
        produce = producer.produce
        if acks is not None:
            acks.expect(len(records))
        for n, (topic, key, value, headers, partition) in enumerate(records):
            try:
                produce(
                    topic, value, key, partition=partition, headers=headers, on_delivery=callback
                )
            except BufferError:  # the local queue is full: let it drain, then retry
                deadline = time.monotonic() + self.call_timeout_s
                while True:
                    if time.monotonic() > deadline or self.stop():
                        if acks is not None:  # the rest of the batch was never queued
                            acks.expect(n - len(records))
                        raise _QueueFull("the producer queue stayed full") from None
                    producer.poll(0.05)
                    try:
                        produce(
                            topic,
                            value,
                            key,
                            partition=partition,
                            headers=headers,
                            on_delivery=callback,
                        )
                        break
                    except BufferError:
                        continue

    def rewind_to_committed(self, consumed: Sequence[Message]) -> None:
        """Seek the partitions of `consumed` back to their last committed offsets.

        In exactly-once mode those equal the first offsets consumed since the last commit (each
        delivery commits before the next starts), which is the fallback when the coordinator
        cannot be asked.
        """
        partitions = sorted({position(m)[:2] for m in consumed})
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
            self.rewind(consumed)
            return
        first = first_offsets(consumed)
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else first[(tp.topic, tp.partition)]
            self._seek(TopicPartition(tp.topic, tp.partition, offset))
        self.health.trouble("rewound to the committed offsets", "rewound")

    def rewind(self, consumed: Sequence[Message]) -> None:
        """Seek back to the first offset of `consumed` per partition, to process it again."""
        for (topic, partition), offset in first_offsets(consumed).items():
            self._seek(TopicPartition(topic, partition, offset))

    def _seek(self, tp: TopicPartition) -> None:
        try:
            self.consumer.seek(tp)
        except KafkaException:
            # Revoked meanwhile: its next owner resumes from the committed offset.
            log.info("seek failed (partition revoked?)", partition=tp.partition)


class _QueueFull(Exception):
    pass
