"""The relay: deliver committed outbox messages to Kafka or Celery and mark them published.

Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several API processes can relay at once without
sending a message twice. Messages with the same key are delivered in order: once one fails, the
later ones with that key wait for the next round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import OutboxMessage
from carrara.outbox.service import CHANNEL
from carrara.streams.client_config import producer_config
from carrara.streams.record_signing import SIGNATURE_HEADER, sign
from carrara.streams.resilience import Backoff, LoopHealth

log = structlog.get_logger(__name__)
_wakeup = threading.Event()


def wake() -> None:
    """Tell the background relay that new messages were committed (saves waiting a tick)."""
    _wakeup.set()


# (task name, kwargs, task id, queue or None for the default queue)
TaskSender = Callable[[str, dict[str, Any], str, str | None], None]


def celery_sender_for(app: Any) -> TaskSender:
    """A sender publishing through Celery app `app` (its broker, its serializer)."""

    def send(name: str, kwargs: dict[str, Any], task_id: str, queue: str | None = None) -> None:
        app.send_task(name, kwargs=kwargs, task_id=task_id, queue=queue)

    return send


def celery_sender(
    name: str, kwargs: dict[str, Any], task_id: str, queue: str | None = None
) -> None:
    """Publish through the training workers' Celery app (the default)."""
    from carrara.training.worker import app

    celery_sender_for(app)(name, kwargs, task_id, queue)


class OutboxRelay:
    def __init__(
        self,
        kafka_bootstrap: str,
        send_task: TaskSender = celery_sender,
        delivery_timeout_ms: int = 10_000,
        signing: tuple[str, bytes] | None = None,
    ) -> None:
        self._bootstrap = kafka_bootstrap
        # (topic, key): records produced to that topic (the deployments topic) are signed over
        # the exact bytes sent (carrara.streams.record_signing), so scorers can verify them.
        self._signing = signing
        self._delivery_timeout_ms = delivery_timeout_ms
        self._fatal: str | None = None
        self._producer = self._new_producer()
        self._send_task = send_task
        self._timeout_s = delivery_timeout_ms / 1000 + 5
        # What the last round could not deliver (row id -> reason): the relay's health.
        self.last_errors: dict[int, str] = {}

    def _new_producer(self) -> Producer:
        return Producer(
            producer_config(
                self._bootstrap,
                **{
                    "message.timeout.ms": self._delivery_timeout_ms,
                    "log_level": 3,
                    "error_cb": self._on_error,
                },
            )
        )

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():  # e.g. the idempotent producer's state is lost: only a new one helps
            self._fatal = str(error)

    def run_once(self, session: Session, batch: int = 200) -> int:
        """Deliver up to `batch` pending messages in `session`'s transaction; returns how many."""
        if self._fatal is not None:
            log.warning("outbox relay: rebuilding its Kafka producer", error=self._fatal)
            self._fatal = None
            self._producer = self._new_producer()
        self.last_errors = {}
        rows = list(
            session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
                .order_by(OutboxMessage.id)
                .limit(batch)
                .with_for_update(skip_locked=True)
            )
        )
        if not rows:
            return 0
        failed_keys: set[tuple[str, str | None]] = set()
        errors: dict[int, str] = {}
        kafka_rows: list[OutboxMessage] = []
        for row in rows:
            group = (row.destination, row.key)
            if group in failed_keys:
                errors[row.id] = "waiting for an earlier message with the same key"
                continue
            if row.kind == "celery":
                try:
                    self._send_task(
                        row.destination,
                        row.payload or {},
                        row.key or str(row.id),
                        (row.headers or {}).get("queue"),
                    )
                except Exception as exc:  # broker down: keep the row, retry next round
                    errors[row.id] = f"{type(exc).__name__}: {exc}"
                    failed_keys.add(group)
            else:
                kafka_rows.append(row)
                self._produce(row, errors)
        if kafka_rows:
            self._producer.flush(self._timeout_s)
        now = datetime.now(UTC)
        delivered = 0
        self.last_errors = errors
        for row in rows:
            if row.id in errors:
                row.attempts += 1
                row.last_error = errors[row.id][:2000]
            else:
                row.published_at = now
                row.last_error = None
                delivered += 1
        return delivered

    def _produce(self, row: OutboxMessage, errors: dict[int, str]) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors[row.id] = str(err)

        value = None if row.payload is None else orjson.dumps(row.payload)
        headers: list[tuple[str, str | bytes | None]] = [
            (k, v) for k, v in row.headers.items() if k != SIGNATURE_HEADER
        ]
        if self._signing is not None and row.destination == self._signing[0] and value is not None:
            headers.append((SIGNATURE_HEADER, sign(self._signing[1], row.key or "", value)))
        try:
            self._producer.produce(
                row.destination,
                key=row.key,
                value=value,
                headers=headers,
                on_delivery=on_delivery,
            )
        except (BufferError, KafkaException) as exc:
            errors[row.id] = str(exc)


class OutboxListener:
    """LISTENs for the outbox channel and wakes the relay the moment a writer commits.

    Another API process's commit cannot call `wake()` here; its NOTIFY arrives instead. Without
    the listener (or while Postgres is away) the relay still polls every second.
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox-listen", daemon=True)
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        backoff = Backoff(initial_s=1.0, cap_s=30.0)
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    self.listening.set()
                    backoff.reset()
                    _wakeup.set()  # anything committed while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            _wakeup.set()
            except psycopg.Error as exc:
                self.listening.clear()
                log.debug("outbox listener reconnecting", error=str(exc))
                self._stop.wait(backoff.next_delay())


class BackgroundRelay:
    """Runs the relay in a thread of the API process: on every commit wake-up, else every second."""

    def __init__(
        self,
        relay: OutboxRelay,
        session_factory: Callable[[], Session],
        periodic: list[tuple[float, Callable[[Session], int]]] | None = None,
        stall_after_s: float = 60.0,
        poll_s: float = 1.0,
    ) -> None:
        self._relay = relay
        self._poll_s = poll_s  # a safety net: commits wake the relay (wake() / NOTIFY)
        self._session_factory = session_factory
        # Other control-plane chores run on the same thread, each every `interval` seconds
        # (e.g. the training reaper); they write outbox rows the relay then delivers.
        self._periodic = [(interval, job, [0.0]) for interval, job in periodic or []]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outbox-relay", daemon=True)
        # Progress: a round left nothing undelivered (all sent, or nothing pending).
        self.health = LoopHealth("outbox-relay", stall_after_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        _wakeup.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        backoff = Backoff(initial_s=1.0, cap_s=10.0)
        while not self._stop.is_set():
            self.health.beat()
            _wakeup.wait(timeout=self._poll_s)
            _wakeup.clear()
            try:
                self._run_periodic()
                with self._session_factory() as session, session.begin():
                    delivered = self._relay.run_once(session)
                if delivered:
                    log.info("outbox relayed", delivered=delivered)
                errors = self._relay.last_errors
                if errors:
                    # Rows stay pending with their error; retried next round (Kafka or Redis away).
                    self.health.trouble(next(iter(errors.values())), connection=True)
                else:
                    self.health.progress()
                    backoff.reset()
            except Exception as exc:  # Postgres away, etc.
                self.health.trouble(f"{type(exc).__name__}: {exc}")
                log.debug("outbox relay round failed", exc_info=True)
                self._stop.wait(backoff.next_delay())

    def _run_periodic(self) -> None:
        now = time.monotonic()
        for interval, job, last in self._periodic:
            if now - last[0] < interval:
                continue
            last[0] = now
            with self._session_factory() as session, session.begin():
                if job(session):
                    session.info["outbox_pending"] = True
                    _wakeup.set()
