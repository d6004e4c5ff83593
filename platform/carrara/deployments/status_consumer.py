"""The control plane's view of the scorers: consume the compacted status topic into Postgres.

Every API process reads the whole topic from the beginning (no consumer-group offsets: compaction
keeps the latest record per instance, so a replay rebuilds the table) and upserts one row per
scorer instance. Rows are ordered by the scorer's own `updated_at`, so several API processes
replaying the topic at once never put an older record over a newer one.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    Message,
)
from confluent_kafka import TopicPartition as KafkaPartition
from sqlalchemy import delete, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from carrara.models import ScorerInstance
from carrara.streams.client_config import consumer_config
from carrara.streams.resilience import Backoff, LoopHealth, caught_up
from carrara.streams.scorer_status import FORMAT_VERSION, ScorerStatus, decode_status

log = structlog.get_logger(__name__)

# Bounds of what a sane scorer sends; anything else is a malformed record, skipped (the columns
# would reject it, and a huge interval would make a dead instance look live for days).
MAX_INTERVAL_S = 3600.0
MAX_ID_LENGTH = 200
MAX_POOL_LENGTH = 100
MAX_HOST_LENGTH = 255
# Instances that vanished without a tombstone (kill -9, lost node) are forgotten after this.
FORGET_AFTER = timedelta(days=1)


class MalformedStatus(ValueError):
    """A status record the control plane cannot store."""


def _aware(value: datetime) -> datetime:
    # A record without a UTC offset is taken as UTC rather than as the database session's zone.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _has_nul(status: ScorerStatus) -> bool:
    # Postgres text and JSONB cannot hold U+0000.
    texts = [status.instance_id, status.pool, status.host]
    for d in status.deployments:
        texts += [d.name, d.last_error or "", *d.loaded_versions]
    return any("\x00" in text for text in texts)


def parse_status(key: bytes, value: bytes) -> ScorerStatus:
    """Decode and check a status record; MalformedStatus says what is wrong with it."""
    try:
        status = decode_status(value)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise MalformedStatus(f"undecodable: {exc}") from exc
    if status.format_version > FORMAT_VERSION:
        raise MalformedStatus(f"format_version {status.format_version} is newer than this API's")
    try:
        key_text = key.decode()
    except UnicodeDecodeError as exc:
        raise MalformedStatus("the key is not UTF-8") from exc
    if key_text != status.instance_id:
        raise MalformedStatus(
            f"the key {key_text!r} is not the record's instance_id {status.instance_id!r}"
        )
    if not 0 < len(status.instance_id) <= MAX_ID_LENGTH:
        raise MalformedStatus(f"instance_id must have 1 to {MAX_ID_LENGTH} characters")
    if not 0 < len(status.pool) <= MAX_POOL_LENGTH:
        raise MalformedStatus(f"pool must have 1 to {MAX_POOL_LENGTH} characters")
    if len(status.host) > MAX_HOST_LENGTH:
        raise MalformedStatus(f"host is longer than {MAX_HOST_LENGTH} characters")
    if not (math.isfinite(status.interval_s) and 0 < status.interval_s <= MAX_INTERVAL_S):
        raise MalformedStatus(f"interval_s must be in (0, {MAX_INTERVAL_S:g}]")
    if _has_nul(status):
        raise MalformedStatus("a text field contains a NUL character")
    return status


def apply_status_record(
    session: Session, key: bytes, value: bytes | None, *, seen_at: datetime | None = None
) -> None:
    """Store one status-topic record: upsert by instance id; a tombstone forgets the instance.

    `seen_at` is when the control plane received it (default: now). A malformed record is logged
    and skipped; it never raises for what the record contains.
    """
    if value is None:
        try:
            instance_id = key.decode()
        except UnicodeDecodeError:
            log.warning("skipping a scorer status tombstone with a non-UTF-8 key", key=key[:200])
            return
        session.execute(delete(ScorerInstance).where(ScorerInstance.instance_id == instance_id))
        return
    try:
        status = parse_status(key, value)
    except MalformedStatus as exc:
        log.warning("skipping a malformed scorer status record", key=key[:200], error=str(exc))
        return
    row = {
        "instance_id": status.instance_id,
        "pool": status.pool,
        "host": status.host,
        "started_at": _aware(status.started_at),
        "updated_at": _aware(status.updated_at),
        "seen_at": seen_at or datetime.now(UTC),
        "interval_s": status.interval_s,
        "stopping": status.stopping,
        "deployments": msgspec.to_builtins(status.deployments),
    }
    stmt = insert(ScorerInstance).values(**row)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ScorerInstance.instance_id],
        set_={
            **{name: stmt.excluded[name] for name in row if name not in ("instance_id", "seen_at")},
            # A replay of the record already stored must not move its arrival back in time.
            "seen_at": func.greatest(ScorerInstance.seen_at, stmt.excluded.seen_at),
        },
        # Records of one instance are ordered by its clock: an older replay never wins.
        where=ScorerInstance.updated_at <= stmt.excluded.updated_at,
    )
    try:
        with session.begin_nested():
            session.execute(stmt)
    except (DataError, IntegrityError) as exc:
        # What slipped past parse_status (e.g. a date Postgres cannot store): skip the record,
        # keep the batch.
        log.warning(
            "skipping a scorer status record the database refused",
            instance_id=status.instance_id,
            error=str(exc.orig),
        )


def forget_stale_instances(session: Session, older_than: datetime) -> int:
    """Delete instances not seen since `older_than` (gone without a tombstone); how many."""
    result = session.execute(delete(ScorerInstance).where(ScorerInstance.seen_at < older_than))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


class StatusConsumer:
    """A thread of the API process that keeps `scorer_instances` in step with the status topic."""

    def __init__(
        self,
        kafka_bootstrap: str,
        topic: str,
        session_factory: Callable[[], Session],
        *,
        batch: int = 500,
        forget_after: timedelta = FORGET_AFTER,
        stall_after_s: float = 60.0,
    ) -> None:
        self._topic = topic
        self._session_factory = session_factory
        self._batch = batch
        self._forget_after = forget_after
        # A group id of its own and no commits: every process reads the whole topic, always.
        self._consumer = Consumer(
            consumer_config(
                kafka_bootstrap,
                f"carrara-scorer-status-{uuid.uuid4().hex}",
                **{"enable.auto.commit": False, "log_level": 3},
            )
        )
        # Offset (per partition) below which records were written before this process started.
        self._history_end: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scorer-status", daemon=True)
        self.caught_up = threading.Event()
        # Progress: records applied, or the topic confirmed read to its end.
        self.health = LoopHealth("scorer-status", stall_after_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        last_forget = 0.0
        last_idle_check = 0.0
        backoff = Backoff(initial_s=1.0, cap_s=10.0)
        try:
            while not self._stop.is_set():
                self.health.beat()
                try:
                    if not self._history_end and not self._assign():
                        self._stop.wait(2.0)
                        continue
                    messages = self._consumer.consume(self._batch, timeout=0.5)
                    records = [m for m in messages if m.error() is None]
                    for m in messages:
                        error = m.error()
                        if error is not None:
                            self.health.on_consumer_error(error)
                    if records:
                        self._store(records)
                        self.health.progress()
                    else:
                        if not self.caught_up.is_set() and self._at_end():
                            self.caught_up.set()
                        if time.monotonic() - last_idle_check > 2.0:
                            last_idle_check = time.monotonic()
                            if caught_up(self._consumer, self._topic):
                                self.health.progress()
                    if time.monotonic() - last_forget > 60:
                        last_forget = time.monotonic()
                        self._forget()
                    backoff.reset()
                except Exception as exc:
                    # Kafka or Postgres down: the API keeps serving the last known status.
                    self.health.trouble(f"{type(exc).__name__}: {exc}")
                    log.debug("scorer status round failed", exc_info=True)
                    self._stop.wait(backoff.next_delay())
        finally:
            self._consumer.close()

    def _assign(self) -> bool:
        """Assign every partition of the topic from its beginning; False if it does not exist."""
        topic = self._consumer.list_topics(self._topic, timeout=5).topics.get(self._topic)
        if topic is None or topic.error is not None or not topic.partitions:
            return False
        partitions = [KafkaPartition(self._topic, p, OFFSET_BEGINNING) for p in topic.partitions]
        history_end = {}
        for tp in partitions:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=5)
            history_end[tp.partition] = high if high > low else 0
        self._consumer.assign(partitions)
        self._history_end = history_end  # set last: a failed attempt is retried from scratch
        log.info("consuming scorer status", topic=self._topic, partitions=len(partitions))
        return True

    def _at_end(self) -> bool:
        """Whether every record written before this process started has been applied."""
        positions = self._consumer.position(
            [KafkaPartition(self._topic, p) for p in self._history_end]
        )
        # An empty partition is read; otherwise the position (negative until the first fetch)
        # must have passed the end of the history.
        return all(
            self._history_end[tp.partition] == 0 or tp.offset >= self._history_end[tp.partition]
            for tp in positions
        )

    def _seen_at(self, message: Message, now: datetime) -> datetime:
        # A record written before this process started is as old as Kafka says (at most now):
        # replaying the last record of a scorer killed yesterday must not make it look live.
        if (message.offset() or 0) >= self._history_end.get(message.partition() or 0, 0):
            return now
        kind, millis = message.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE:
            return now
        return min(now, datetime.fromtimestamp(millis / 1000, UTC))

    def _store(self, records: list[Message]) -> None:
        """Apply a batch in one transaction, retrying while Postgres is down (nothing is lost)."""
        while not self._stop.is_set():
            now = datetime.now(UTC)
            try:
                with self._session_factory() as session, session.begin():
                    for m in records:
                        apply_status_record(
                            session, m.key() or b"", m.value(), seen_at=self._seen_at(m, now)
                        )
                return
            except Exception:
                log.exception("cannot store scorer status records; retrying", count=len(records))
                self._stop.wait(2.0)

    def _forget(self) -> None:
        with self._session_factory() as session, session.begin():
            forgotten = forget_stale_instances(session, datetime.now(UTC) - self._forget_after)
        if forgotten:
            log.info("forgot scorer instances gone without a tombstone", count=forgotten)
