"""One deployment's consume -> score -> produce loop, in its own thread, through broker outages.

Delivery (exactly once or at least once, and what each does when Kafka fails) is in
`scoring.delivery`. This module owns the clients' lifecycle: a broken client (fatal error, fenced,
a call that hung past its deadline) makes the loop close what it can, wait with backoff, build a
new consumer and producer and resume from the committed offsets. The loop never dies of a Kafka
error; if it cannot make progress while events wait, its `LoopHealth` says so (`stalled`), and the
scorer's /healthz fails so the orchestrator restarts the process.

The serving state (models, splitter) is swapped by the reconciler and read once per batch, so a
model change happens between two micro-batches, never inside one. SIGTERM sets `stop`: the loop
finishes and commits the batch in hand, then closes the consumer (leaving the group at once).

Why one module of ~500 lines: the loop, its rebalance callbacks and the clients' lifecycle share
the runner's state (the commit in flight, the feature state, the serving state) and must be read
together to see that no batch is committed twice or lost; delivery and scoring live apart.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (
    AdminClient,
    OffsetSpec,  # pyright: ignore[reportPrivateImportUsage] (public, re-exported without __all__)
)

from carrara.scoring import metrics
from carrara.scoring.batch import BatchResult, InputBatch, ServingState, score_batch
from carrara.scoring.delivery import Acks, Delivery, InFlight, Redeliver
from carrara.scoring.feature_state import FeatureStore
from carrara.settings import Settings
from carrara.streams.client_config import (
    admin_config,
    latency_consumer_config,
    latency_producer_config,
)
from carrara.streams.resilience import (
    Backoff,
    CallGuard,
    ClientBroken,
    ClientHung,
    LoopHealth,
    caught_up,
    classify,
)

log = structlog.get_logger(__name__)


@dataclass
class _Scored:
    result: BatchResult
    started: float  # perf_counter when scoring began
    # At least once: its records were produced while the previous commit ran (their delivery
    # reports collect here); None: they are produced when its delivery starts.
    produced: Acks | None = None


@dataclass
class _Flight:
    pending: InFlight
    result: BatchResult
    started: float


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
        self.rebuilds = 0
        self.health = LoopHealth(
            "scorer", settings.stall_timeout_s, deployment=self.name, instance=instance_id
        )
        self._last_idle_check = 0.0
        self._flight: _Flight | None = None  # the delivery whose commit is in flight
        # Feature-set state of the partitions owned (one per client generation, see `_serve`).
        self.features: FeatureStore | None = None
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
        }
        if s.scorer_static_membership:
            # A restarted instance (same id) gets its partitions back without a rebalance.
            config["group.instance.id"] = f"{self.instance_id}.{self.name}"[:249]
        config["error_cb"] = self.health.on_client_error
        return Consumer(
            latency_consumer_config(s.kafka_bootstrap, group_id(self.name), s, **config)
        )

    def _producer(self) -> Producer:
        config: dict[str, Any] = {"error_cb": self.health.on_client_error}
        if self.exactly_once:
            # The same id on every rebuild: the new producer fences the old one and aborts its
            # open transaction, so an abandoned client can never commit.
            config["transactional.id"] = f"carrara-scorer.{self.name}.{self.instance_id}"[:249]
        return Producer(
            latency_producer_config(self.settings.kafka_bootstrap, self.settings, **config)
        )

    def _run(self) -> None:
        """Serve until stopped; a broken client is rebuilt after a backoff, never fatal."""
        backoff = Backoff(initial_s=1.0, cap_s=15.0)
        while not self.stop_event.is_set():
            try:
                self._serve(backoff)
                return
            except ClientBroken as exc:
                self.error = str(exc)
            except Exception as exc:  # an unexpected failure: same remedy, with its traceback
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("scoring loop failed", deployment=self.name)
                self.health.trouble(self.error, "rebuilt clients")
            self.rebuilds += 1
            delay = backoff.next_delay()
            log.warning(
                "rebuilding the scorer's Kafka clients; resuming from the committed offsets",
                deployment=self.name,
                error=self.error,
                in_s=round(delay, 1),
            )
            self.stop_event.wait(delay)

    def _serve(self, backoff: Backoff) -> None:
        guard = CallGuard(f"scorer-{self.name}")
        consumer = self._consumer()
        producer = self._producer()
        # New clients resume from the committed offsets: state is restored from the changelogs.
        features = self.features = FeatureStore(
            self.name,
            self.settings.kafka_bootstrap,
            restore_timeout_s=max(60.0, self.settings.stall_timeout_s),
        )
        clean = False
        try:
            if self.exactly_once:
                self._init_transactions(producer, guard)
            consumer.subscribe(
                [self.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            delivery = Delivery(
                consumer=consumer,
                producer=producer,
                guard=guard,
                health=self.health,
                exactly_once=self.exactly_once,
                call_timeout_s=self.settings.kafka_call_timeout_s,
                stop=self.stop_event.is_set,
            )
            redeliver = Backoff(initial_s=0.1, cap_s=5.0)
            last_lag = 0.0
            while not self.stop_event.is_set():
                # Idle: wait for the next event. A commit in flight: look for new events in
                # short polls (an event that arrives meanwhile is scored at once, not after the
                # commit), and check the commit between them.
                messages = self._collect(consumer, 0.1 if self._flight is None else 0.001)
                flight = self._flight
                if not messages and flight is not None and not flight.pending.commit.settled():
                    continue  # the commit is still running and nothing new came: look again
                scored = self._score(messages) if messages else None
                if scored is not None and flight is not None:
                    messages = self._score_while_committing(
                        consumer, delivery, flight, scored, messages
                    )
                if flight is not None:  # the previous batch's commit, overlapped with scoring
                    self._flight = None
                    if not self._finish(flight, delivery, messages):
                        features.reset()  # the state saw batches that come again
                        self.stop_event.wait(redeliver.next_delay())
                        continue  # rewound: `messages` will be consumed (and scored) again
                    redeliver.reset()
                    backoff.reset()
                if scored is not None:
                    try:
                        pending = delivery.start(scored.result.records, messages, scored.produced)
                        self._flight = _Flight(pending, scored.result, scored.started)
                    except Redeliver as exc:
                        log.info("batch not delivered; it will be scored again", reason=str(exc))
                        features.reset()
                        self.stop_event.wait(redeliver.next_delay())
                elif self._flight is None:
                    self._confirm_idle(consumer)
                if time.monotonic() - last_lag > 5:
                    last_lag = time.monotonic()
                    self._report_lag(consumer)
            if self._flight is not None:  # stopping: commit the batch in hand
                flight, self._flight = self._flight, None
                self._finish(flight, delivery, [])
            delivery.commit_due(wait=True)
            clean = True
        finally:
            self._flight = None
            self._close(consumer, producer, guard, clean)
            self._close_features()

    def _close_features(self) -> None:
        features, self.features = self.features, None
        if features is None:
            return
        try:
            features.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("could not close the feature-state reader", error=str(exc))

    def _score_while_committing(
        self,
        consumer: Consumer,
        delivery: Delivery,
        flight: _Flight,
        scored: _Scored,
        messages: list[Message],
    ) -> list[Message]:
        """While the previous batch's commit runs, score what arrives into this batch.

        The loop never idles behind a commit: it polls in 1 ms steps and the batch grows (up to
        `scorer_max_batch_size`) to go out in the next delivery. At least once, each part's
        predictions are produced at once (only their offsets wait for the commit).
        """
        limit = self.settings.scorer_max_batch_size
        # Until the commit is done or overdue (a hung call is then reported by `_finish`).
        done, stopping = flight.pending.commit.settled, self.stop_event.is_set
        if not self.exactly_once:
            scored.produced = delivery.produce_now(scored.result.records)
        while not done() and len(messages) < limit and not stopping():
            more = self._collect(consumer, 0.001)
            if not more:
                continue
            part = self._score(more).result
            if scored.produced is not None:
                delivery.produce_now(part.records, scored.produced)
            scored.result.absorb(part)
            messages = messages + more
        return messages

    def _init_transactions(self, producer: Producer, guard: CallGuard) -> None:
        """Register the transactional id (fencing any older producer with it), retrying."""
        timeout = self.settings.kafka_call_timeout_s
        retry = Backoff(initial_s=0.5, cap_s=10.0)
        while True:
            try:
                guard.call(
                    "init_transactions", producer.init_transactions, timeout, deadline_s=timeout + 5
                )
                return
            except ClientHung as exc:
                raise ClientBroken(str(exc)) from exc
            except KafkaException as exc:
                if classify(exc) != "retry" or self.stop_event.is_set():
                    raise ClientBroken(f"init_transactions: {exc}") from exc
                self.health.trouble(f"init_transactions: {exc}")
                self.stop_event.wait(retry.next_delay())

    def _close(self, consumer: Consumer, producer: Producer, guard: CallGuard, clean: bool) -> None:
        """Close both clients within deadlines (a hung client is abandoned, never waited on).

        The consumer is closed on a worker of its own: the producer's may be stuck in a hung
        call, and a consumer left open would stay in the group holding its partitions (its
        heartbeats go on) until `max.poll.interval.ms` expires.
        """
        timeout = self.settings.kafka_call_timeout_s
        try:
            if clean:
                guard.call("flush", producer.flush, 10, deadline_s=15)
        except (ClientHung, KafkaException, RuntimeError) as exc:
            log.error("could not flush the scorer's producer; abandoning it", error=str(exc))
        finally:
            guard.close()
        closer = CallGuard(f"close-{self.name}")
        try:
            # Leaves the group now, so the partitions move without waiting for the session.
            closer.call("close", consumer.close, deadline_s=timeout)
        except (ClientHung, KafkaException, RuntimeError) as exc:
            log.error("could not close the scorer's consumer; abandoning it", error=str(exc))
        finally:
            closer.close()

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
        admin = AdminClient(admin_config(self.settings.kafka_bootstrap, self.settings))
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

    def _collect(self, consumer: Consumer, wait_s: float) -> list[Message]:
        """What is there now: wait up to `wait_s` for a first event, then take (without
        waiting) every event already fetched, up to `scorer_batch_size`.

        Batches are adaptive: one event when the input is idle (scored at once, no window to
        fill), larger ones when events queue up behind a commit in flight or a backlog.
        """
        first = consumer.poll(wait_s)
        if first is None:
            return []
        polled = [first]
        size = self.settings.scorer_batch_size
        if size > 1:
            polled.extend(consumer.consume(size - 1, timeout=0))
        return self._good(polled)

    def _good(self, polled: list[Message]) -> list[Message]:
        good = []
        for message in polled:
            error = message.error()
            if error is None:
                good.append(message)
            else:
                self.health.on_consumer_error(error)
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

    def _score(self, messages: list[Message]) -> _Scored:
        started = time.perf_counter()
        state = self._current()
        result = score_batch(
            state, InputBatch.of_messages(self.input_topic, messages), features=self.features
        )
        return _Scored(result, started)

    def _finish(self, flight: _Flight, delivery: Delivery, consumed_since: list[Message]) -> bool:
        """Wait for `flight`'s commit; count it. False when it was rewound (score it again)."""
        try:
            delivery.finish(flight.pending, consumed_since)
        except Redeliver as exc:
            log.info("batch not delivered; it will be scored again", reason=str(exc)[:300])
            return False
        self._count(flight.result, len(flight.pending.batch), time.perf_counter() - flight.started)
        self.health.progress()
        return True

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let the commit in flight land before the partitions move (bounded by its deadline).

        Its outcome is read by the loop; a batch scored for a revoked partition fails its commit
        (the group generation moved on), is aborted and never written twice.
        """
        flight = self._flight
        if flight is not None:
            flight.pending.commit.wait(self.settings.kafka_call_timeout_s)
        if self.features is not None:
            self.features.drop([tp.partition for tp in partitions])

    def _confirm_idle(self, consumer: Consumer) -> None:
        """Nothing consumed: if the broker confirms every assigned partition is read to its end,
        the loop is idle, not stuck (counts as progress). Asked at most once a second; an
        unreachable broker never confirms, so a long outage is a stall.
        """
        now = time.monotonic()
        if now - self._last_idle_check < 1.0:
            return
        self._last_idle_check = now
        if caught_up(consumer, self.input_topic):
            self.health.progress()

    def _count(self, result: BatchResult, consumed: int, seconds: float) -> None:
        metrics.EVENTS_IN.labels(self.name).inc(consumed)
        metrics.BATCH_SECONDS.labels(self.name).observe(seconds)
        now_ms = time.time() * 1000
        for variant, timestamps in result.served_timestamps.items():
            metrics.END_TO_END.observe_ms(self.name, variant, now_ms, timestamps)
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
            # A metadata round trip proves the broker answers (an empty assignment proves nothing:
            # a consumer that lost its coordinator has none).
            consumer.list_topics(self.input_topic, timeout=1.0)
            for tp in consumer.position(consumer.assignment()):
                if tp.offset < 0:
                    continue
                high = consumer.get_watermark_offsets(tp, timeout=1, cached=True)[1]
                metrics.CONSUMER_LAG.labels(self.name, str(tp.partition)).set(
                    max(0, high - tp.offset)
                )
        except KafkaException:
            pass
