"""The monitor process (`carrara-monitor`): predictions, dead letters, inputs and outcomes in;
per-variant aggregates, the outcome join, drift counts and alerts out, all in Postgres.

Exactly-once counting without Kafka transactions: the monitor keeps its own consumer offsets in
Postgres (`monitor_offsets`, see carrara.monitoring.offsets) and writes them in the same
transaction as the aggregates they produced. Before applying a batch it locks the offset rows of
its partitions and skips records below the stored offsets, so a restart (or a rebalance between
two monitors) never counts a record twice or loses one. The consumer group only distributes
partitions between monitors.

This module is the loop; the rest lives by responsibility:
- carrara.monitoring.watched: the deployments watched (`Watched`, read from Postgres);
- carrara.monitoring.topology: the role of each topic, where new partitions start;
- carrara.monitoring.counting: predictions, dead letters and drift counts of inputs;
- carrara.monitoring.join: the outcome join (matched / late / unmatched / invalid / expired);
- carrara.monitoring.alerts and .policies: drift alerts and automatic promotion / rollback,
  checked in `housekeeping`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter, Gauge
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from carrara.models import PendingPrediction
from carrara.monitoring import counting, join
from carrara.monitoring.aggregates import Deltas
from carrara.monitoring.alerts import check_drift
from carrara.monitoring.offsets import store_offsets, unseen
from carrara.monitoring.policies import apply_policies
from carrara.monitoring.topology import Roles, roles_of, start_offsets
from carrara.monitoring.watched import Watched, load_watched
from carrara.settings import Settings
from carrara.streams.client_config import connection_config
from carrara.streams.consumed import first_offsets, position
from carrara.streams.resilience import Backoff, CallGuard, ClientHung, LoopHealth, caught_up
from carrara.streams.schema_registry import Registry

log = structlog.get_logger(__name__)
GROUP_ID = "carrara-monitor"
LAST_BATCH_AGE = Gauge(
    "carrara_monitor_last_batch_age_seconds",
    "Seconds since the monitor last applied a batch or confirmed it had nothing to read",
)
BATCHES = Counter("carrara_monitor_batches_total", "Batches applied to Postgres")


class Monitor:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.stop_event = threading.Event()
        self.watched: dict[str, Watched] = {}
        self.roles: dict[str, Roles] = {}
        self.batches = 0
        self._subscribed: list[str] = []
        # Progress = a batch applied, or every partition read to its end (see streams.resilience).
        self.health = LoopHealth("monitor", settings.stall_timeout_s)
        self._consumer = Consumer(
            {
                **connection_config(settings.kafka_bootstrap, settings),
                "group.id": GROUP_ID,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "isolation.level": "read_committed",
                "fetch.queue.backoff.ms": 10,
                "session.timeout.ms": 10_000,
                "topic.metadata.refresh.interval.ms": 5_000,
                "error_cb": self._on_client_error,
            }
        )
        self._last_refresh = 0.0
        self._last_housekeeping = time.monotonic()
        self._registry: Registry | None = None
        self._last_idle_check = 0.0

    @property
    def registry(self) -> Registry:
        """The Schema Registry client (registry-framed inputs), made on first use."""
        if self._registry is None:
            self._registry = Registry.from_settings(self.settings)
        return self._registry

    # --- topology -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the running deployments; subscribe to the topics they need read."""
        with self.sessions() as session:
            self.watched = load_watched(session)
        self.roles = roles_of(self.watched)
        topics = sorted(self.roles)
        if topics != self._subscribed:
            if topics:
                self._consumer.subscribe(topics, on_assign=self._on_assign)
            else:
                self._consumer.unsubscribe()
            self._subscribed = topics
            log.info("monitoring topics", topics=topics)
        self._last_refresh = time.monotonic()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume each partition at its offset stored in Postgres, or at the deployment's start."""
        start_offsets(self.sessions, self.settings.kafka_bootstrap, self.roles, partitions)
        consumer.incremental_assign(partitions)

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Until stopped. Kafka or Postgres going away is waited out with backoff, never fatal:
        a batch that could not be applied is read again (its offsets live in Postgres with the
        aggregates, so nothing is counted twice). A loop that stays stuck shows as stalled.
        """
        backoff = Backoff(initial_s=1.0, cap_s=15.0)
        guard = CallGuard("monitor")
        try:
            while not self.stop_event.is_set():
                try:
                    self._turn()
                    backoff.reset()
                except Exception as exc:
                    self.health.trouble(f"{type(exc).__name__}: {exc}")
                    log.debug("monitor round failed", exc_info=True)
                    self.stop_event.wait(backoff.next_delay())
        finally:
            try:
                guard.call("close", self._consumer.close, deadline_s=30)
            except (ClientHung, KafkaException, RuntimeError) as exc:
                log.error("could not close the monitor's consumer", error=str(exc))
            guard.close()

    def _turn(self) -> None:
        if time.monotonic() - self._last_refresh > 10:
            self.refresh()
        messages = []
        for m in self._consumer.consume(2000, timeout=0.5):
            error = m.error()
            if error is None:
                messages.append(m)
            else:
                self.health.on_consumer_error(error)
        if messages:
            try:
                self.process(messages)
            except Exception:
                self._rewind(messages)
                raise
            self.health.progress()
        elif time.monotonic() - self._last_idle_check > 1.0:
            self._last_idle_check = time.monotonic()
            if caught_up(self._consumer):
                self.health.progress()
        if time.monotonic() - self._last_housekeeping > 15:
            self.housekeeping()

    def _rewind(self, messages: list[Message]) -> None:
        """Seek back to the first record of each partition in an unapplied batch."""
        for (topic, partition), offset in first_offsets(messages).items():
            with contextlib.suppress(KafkaException):
                self._consumer.seek(TopicPartition(topic, partition, offset))

    def healthy(self) -> tuple[bool, dict[str, object]]:
        """Liveness for /healthz: the loop is not stalled (see `LoopHealth`)."""
        age = self.health.age_s()
        LAST_BATCH_AGE.set(age)
        stalled = self.health.is_stalled()
        return not stalled, {
            "stalled": stalled,
            "seconds_since_progress": round(age, 1),
            "last_error": self.health.last_error if self.health.in_trouble or stalled else None,
            "batches": self.batches,
        }

    def _on_client_error(self, error: KafkaError) -> None:
        self.health.on_client_error(error)

    def process(self, messages: list[Message]) -> None:
        """Apply one batch atomically: aggregates, join state and offsets in one transaction."""
        with self.sessions() as session, session.begin():
            messages = unseen(session, messages)
            if not messages:
                return
            deltas = Deltas()
            inputs = counting.new_inputs()
            framed = counting.new_framed()
            pending: list[dict[str, Any]] = []
            outcomes: list[tuple[Message, set[str]]] = []
            for message in messages:
                roles = self.roles.get(position(message)[0])
                if roles is None:
                    continue
                if roles.predictions:
                    counting.count_prediction(message, self.watched, deltas, pending)
                for name in roles.dead_letters:
                    counting.count_dead_letter(message, name, deltas)
                if roles.inputs:
                    counting.collect_input(message, roles.inputs, self.watched, inputs, framed)
                if roles.outcomes:
                    outcomes.append((message, roles.outcomes))
            if framed:
                counting.decode_framed(framed, self.watched, self.registry, inputs)
            counting.count_inputs(inputs, self.watched, deltas)
            if pending:
                session.execute(insert(PendingPrediction).values(pending).on_conflict_do_nothing())
            blocked: dict[tuple[str, int], int] = {}
            for message, names in outcomes:
                topic, partition, offset = position(message)
                if (topic, partition) in blocked:
                    continue  # keep the partition's order: nothing after a held outcome
                if any(join.too_early(session, message, self.watched[name]) for name in names):
                    blocked[(topic, partition)] = offset
                    continue
                for name in names:
                    join.join_outcome(session, message, self.watched[name], deltas)
            deltas.flush(session)
            store_offsets(session, messages, blocked)
        for (topic, partition), offset in blocked.items():
            # Read the held outcome again in a later batch (its prediction may still be on the way).
            with contextlib.suppress(KafkaException):
                self._consumer.seek(TopicPartition(topic, partition, offset))
        self.batches += 1
        BATCHES.inc()

    # --- housekeeping ---------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Expire unjoined predictions past their window; raise drift alerts; apply policies."""
        self._last_housekeeping = time.monotonic()
        with self.sessions() as session, session.begin():
            join.expire_pending(session, self.watched, datetime.now(UTC))
        with self.sessions() as session, session.begin():
            for w in self.watched.values():
                check_drift(session, self.settings, w)
                if w.outcomes_topic:
                    apply_policies(session, self.settings, w)
