"""The monitor process (`carrara-monitor`): predictions, dead letters, inputs and outcomes in;
per-variant aggregates, the outcome join, drift counts and alerts out, all in Postgres.

Exactly-once counting without Kafka transactions: the monitor keeps its own consumer offsets in
Postgres (`monitor_offsets`) and writes them in the same transaction as the aggregates they
produced. Before applying a batch it locks the offset rows of its partitions and skips records
below the stored offsets, so a restart (or a rebalance between two monitors) never counts a
record twice or loses one. The consumer group only distributes partitions between monitors.

The join keeps every prediction awaiting an outcome in `pending_predictions` (it survives a
crash). An outcome joins the latest prediction made for its entity key (or, with `join_by:
source`, the prediction of the exact input offset it names) — every variant's prediction of that
event, shadow ones included. An outcome arriving more than `window_s` after its prediction is
counted late; one with no prediction at all, unmatched; one without a usable value, invalid.
Predictions still unjoined after two windows are removed and counted as expired (the second window
is what lets a late outcome be recognised as late rather than unmatched).

An outcome read before its own prediction (after a restart, or while the prediction topic lags)
is held, its partition not advanced, for up to 30 s before it counts as unmatched.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from confluent_kafka import OFFSET_END, Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from carrara.models import (
    Deployment,
    DeploymentRevision,
    JoinedOutcome,
    ModelVersion,
    MonitorOffset,
    PendingPrediction,
    RegisteredModel,
)
from carrara.monitoring.aggregates import Deltas, as_float, latency_bin, minute, score_bin
from carrara.settings import Settings
from carrara.streams.client_config import admin_config
from carrara.streams.prediction_record import H_DEPLOYMENT, decode_prediction

log = structlog.get_logger(__name__)
GROUP_ID = "carrara-monitor"
# Clocks of scorers and outcome producers differ a little: an outcome may carry a timestamp
# slightly before its prediction's.
CLOCK_SKEW = timedelta(seconds=5)
# How long an outcome whose prediction has not been read yet waits before it counts as unmatched.
OUTCOME_GRACE = timedelta(seconds=30)


@dataclass
class Watched:
    """A running deployment, as the monitor needs it."""

    name: str
    created_ms: int
    input_topic: str
    output_topic: str
    key_field: str
    champion: str
    variants: dict[str, dict[str, Any]]
    monitoring: dict[str, Any] | None
    task: str | None = None
    label_classes: list[Any] | None = None
    # Drift: the champion version's training profile per feature, and that version's row id.
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    profile_version_id: int | None = None

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.input_topic}.dead-letters"

    @property
    def outcomes_topic(self) -> str | None:
        return (self.monitoring or {}).get("outcomes_topic")

    @property
    def window(self) -> timedelta:
        return timedelta(seconds=int((self.monitoring or {}).get("window_s") or 86_400))


def load_watched(session: Session) -> dict[str, Watched]:
    """Every running deployment with its current spec, champion and training profile."""
    watched: dict[str, Watched] = {}
    rows = session.execute(
        select(Deployment, DeploymentRevision)
        .join(
            DeploymentRevision,
            (DeploymentRevision.deployment_id == Deployment.id)
            & (DeploymentRevision.number == Deployment.current_revision),
        )
        .where(Deployment.stopped_at.is_(None))
    ).all()
    for deployment, revision in rows:
        spec = revision.spec
        if not spec:
            continue
        variants = {v["name"]: v for v in spec["variants"]}
        monitoring = spec.get("monitoring") or None
        live = [v for v in spec["variants"] if not v.get("shadow")]
        champion = (monitoring or {}).get("champion") or max(live, key=lambda v: v["weight"])[
            "name"
        ]
        item = Watched(
            name=deployment.name,
            created_ms=int(deployment.created_at.timestamp() * 1000),
            input_topic=spec["input_topic"],
            output_topic=spec["output_topic"],
            key_field=spec["key_field"],
            champion=champion,
            variants=variants,
            monitoring=monitoring,
        )
        champion_variant = variants.get(champion)
        if champion_variant is not None:
            version = session.scalar(
                select(ModelVersion)
                .join(RegisteredModel)
                .where(
                    RegisteredModel.name == champion_variant["model"],
                    ModelVersion.version == champion_variant["version"],
                )
            )
            profile = version.feature_profile if version is not None else None
            if profile:
                item.task = profile.get("task")
                item.label_classes = profile.get("label_classes")
                item.profiles = profile.get("features") or {}
                item.profile_version_id = version.id if version is not None else None
        watched[deployment.name] = item
    return watched


def _norm_label(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Roles:
    """What a topic is to the monitor (one topic may be several things)."""

    predictions: bool = False
    dead_letters: set[str] = field(default_factory=set)  # deployments
    inputs: set[str] = field(default_factory=set)
    outcomes: set[str] = field(default_factory=set)
    since_ms: int = 0  # where a partition without a stored offset starts


class Monitor:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.stop_event = threading.Event()
        self.watched: dict[str, Watched] = {}
        self.roles: dict[str, Roles] = {}
        self.batches = 0
        self._subscribed: list[str] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": GROUP_ID,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                "isolation.level": "read_committed",
                "fetch.queue.backoff.ms": 10,
                "session.timeout.ms": 10_000,
                "topic.metadata.refresh.interval.ms": 5_000,
            }
        )
        self._last_refresh = 0.0
        self._last_housekeeping = time.monotonic()

    # --- topology -------------------------------------------------------------------------------

    def refresh(self) -> None:
        with self.sessions() as session:
            self.watched = load_watched(session)
        roles: dict[str, Roles] = defaultdict(Roles)
        for w in self.watched.values():
            for topic, setter in (
                (w.output_topic, lambda r: setattr(r, "predictions", True)),
                (w.dead_letter_topic, lambda r, n=w.name: r.dead_letters.add(n)),
                (w.input_topic, lambda r, n=w.name, p=w.profiles: r.inputs.add(n) if p else None),
                (w.outcomes_topic, lambda r, n=w.name: r.outcomes.add(n)),
            ):
                if topic:
                    role = roles[topic]
                    setter(role)
                    role.since_ms = min(role.since_ms or w.created_ms, w.created_ms)
        self.roles = {
            t: r
            for t, r in roles.items()
            if r.predictions or r.dead_letters or r.inputs or r.outcomes
        }
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
        with self.sessions() as session:
            stored = {
                (row.topic, row.partition): row.next_offset
                for row in session.scalars(
                    select(MonitorOffset).where(
                        MonitorOffset.topic.in_({tp.topic for tp in partitions})
                    )
                )
            }
        fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in stored]
        starts: dict[tuple[str, int], int] = {}
        if fresh:
            try:
                admin = AdminClient(admin_config(self.settings.kafka_bootstrap))
                futures = admin.list_offsets(
                    {
                        TopicPartition(tp.topic, tp.partition): OffsetSpec.for_timestamp(
                            self.roles.get(tp.topic, Roles()).since_ms
                        )
                        for tp in fresh
                    },
                    request_timeout=10,
                )
                for tp, future in futures.items():
                    starts[(tp.topic, tp.partition)] = future.result(timeout=15).offset
            except KafkaException as exc:
                log.warning(
                    "could not position new partitions; starting at the beginning", error=str(exc)
                )
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if key in stored:
                tp.offset = stored[key]
            elif key in starts:
                tp.offset = starts[key] if starts[key] >= 0 else OFFSET_END
        consumer.incremental_assign(partitions)

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        self.refresh()
        try:
            while not self.stop_event.is_set():
                if time.monotonic() - self._last_refresh > 10:
                    self.refresh()
                messages = [
                    m for m in self._consumer.consume(2000, timeout=0.5) if m.error() is None
                ]
                if messages:
                    self.process(messages)
                if time.monotonic() - self._last_housekeeping > 15:
                    self.housekeeping()
        finally:
            self._consumer.close()

    def process(self, messages: list[Message]) -> None:
        """Apply one batch atomically: aggregates, join state and offsets in one transaction."""
        with self.sessions() as session, session.begin():
            messages = self._unseen(session, messages)
            if not messages:
                return
            deltas = Deltas()
            inputs: dict[tuple[str, str, datetime], list[Any]] = defaultdict(list)
            pending: list[dict[str, Any]] = []
            outcomes: list[tuple[Message, set[str]]] = []
            for message in messages:
                roles = self.roles.get(message.topic())
                if roles is None:
                    continue
                if roles.predictions:
                    self._prediction(message, deltas, pending)
                for name in roles.dead_letters:
                    self._dead_letter(message, name, deltas)
                if roles.inputs:
                    self._input(message, roles.inputs, inputs)
                if roles.outcomes:
                    outcomes.append((message, roles.outcomes))
            self._count_inputs(inputs, deltas)
            if pending:
                session.execute(insert(PendingPrediction).values(pending).on_conflict_do_nothing())
            blocked: dict[tuple[str, int], int] = {}
            for message, names in outcomes:
                position = (message.topic(), message.partition())
                if position in blocked:
                    continue  # keep the partition's order: nothing after a held outcome
                if any(self._too_early(session, message, name) for name in names):
                    blocked[position] = message.offset()
                    continue
                for name in names:
                    self._outcome(session, message, name, deltas)
            deltas.flush(session)
            self._store_offsets(session, messages, blocked)
        for (topic, partition), offset in blocked.items():
            # Read the held outcome again in a later batch (its prediction may still be on the way).
            with contextlib.suppress(KafkaException):
                self._consumer.seek(TopicPartition(topic, partition, offset))
        self.batches += 1

    def _unseen(self, session: Session, messages: list[Message]) -> list[Message]:
        """Lock the batch's offset rows; drop records an earlier transaction already applied."""
        positions = {(m.topic(), m.partition()) for m in messages}
        stored = {
            (row.topic, row.partition): row.next_offset
            for row in session.scalars(
                select(MonitorOffset)
                .where(MonitorOffset.topic.in_({t for t, _ in positions}))
                .with_for_update()
            )
        }
        return [m for m in messages if m.offset() >= stored.get((m.topic(), m.partition()), -1)]

    def _store_offsets(
        self, session: Session, messages: list[Message], blocked: dict[tuple[str, int], int]
    ) -> None:
        nexts: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic(), m.partition())
            nexts[key] = max(nexts.get(key, 0), m.offset() + 1)
        for key, offset in blocked.items():
            nexts[key] = offset  # the held outcome is not consumed yet
        stmt = insert(MonitorOffset).values(
            [{"topic": t, "partition": p, "next_offset": o} for (t, p), o in nexts.items()]
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["topic", "partition"],
                set_={"next_offset": stmt.excluded.next_offset},
            )
        )

    # --- record kinds ---------------------------------------------------------------------------

    def _prediction(self, message: Message, deltas: Deltas, pending: list[dict[str, Any]]) -> None:
        try:
            p = decode_prediction(message.value() or b"")
        except Exception:  # not a prediction record (e.g. another producer on the topic)
            return
        w = self.watched.get(p.deployment)
        if w is None or w.output_topic != message.topic():
            return
        bucket = minute(p.scored_at_ms or message.timestamp()[1])
        d = deltas.variant(p.deployment, p.variant, bucket)
        d.shadow = p.shadow
        d.model_version = p.model_version
        d.predictions += 1
        score = p.score if isinstance(p.score, float | int) else None
        if isinstance(p.score, list) and p.score:
            score = max(p.score)
        if score is not None and math.isfinite(score):
            d.score_sum += score
            d.score_histogram[score_bin(score)] += 1
        d.latency_histogram[latency_bin(p.latency_ms)] += 1
        if w.outcomes_topic:
            pending.append(
                {
                    "deployment": p.deployment,
                    "source_topic": p.topic,
                    "source_partition": p.partition,
                    "source_offset": p.offset,
                    "variant": p.variant,
                    "entity_key": p.key,
                    "shadow": p.shadow,
                    "model_version": p.model_version,
                    "score": p.score,
                    "label": p.label,
                    "predicted_at": datetime.fromtimestamp((p.scored_at_ms or 0) / 1000, tz=UTC),
                }
            )

    def _dead_letter(self, message: Message, name: str, deltas: Deltas) -> None:
        headers = dict(message.headers() or [])
        if headers.get(H_DEPLOYMENT, b"").decode(errors="replace") != name:
            return
        deltas.variant(name, "-", minute(message.timestamp()[1])).dead_letters += 1

    def _input(
        self, message: Message, names: set[str], inputs: dict[tuple[str, str, datetime], list[Any]]
    ) -> None:
        try:
            event = orjson.loads(message.value() or b"")
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        bucket = minute(message.timestamp()[1])
        for name in names:
            for feature in self.watched[name].profiles:
                inputs[(name, feature, bucket)].append(event.get(feature))

    def _count_inputs(
        self, inputs: dict[tuple[str, str, datetime], list[Any]], deltas: Deltas
    ) -> None:
        """Count the batch's input values in the training profile's bins, per feature."""
        from carrara.monitoring.statistics import bin_counts

        for (name, feature, bucket), values in inputs.items():
            w = self.watched[name]
            profile = w.profiles[feature]
            if w.profile_version_id is None:
                continue
            if profile.get("kind") != "category":
                values = [as_float(v) if v is not None else math.nan for v in values]
                values = [math.nan if v is None else v for v in values]
            counts = list(bin_counts(profile, values))
            drift = deltas.drift_for(name, feature, bucket, w.profile_version_id, len(counts))
            drift.counts = [a + b for a, b in zip(drift.counts, counts, strict=True)]
            drift.missing += len(values) - sum(counts)

    def _too_early(self, session: Session, message: Message, name: str) -> bool:
        """An outcome with no prediction yet, young enough that its prediction may still come.

        Predictions and outcomes are separate topics: after a restart (or under lag) the monitor
        can read an outcome before the prediction it answers. Such an outcome is held (its
        partition is not advanced) for up to OUTCOME_GRACE before it counts as unmatched.
        """
        observed_at = datetime.fromtimestamp(message.timestamp()[1] / 1000, tz=UTC)
        if datetime.now(UTC) - observed_at > OUTCOME_GRACE:
            return False
        try:
            event = orjson.loads(message.value() or b"")
        except orjson.JSONDecodeError:
            return False
        if not isinstance(event, dict):
            return False
        w = self.watched[name]
        return self._predictions_for(session, w, event, observed_at) is None

    def _outcome(self, session: Session, message: Message, name: str, deltas: Deltas) -> None:
        w = self.watched[name]
        observed_ms = message.timestamp()[1]
        observed_at = datetime.fromtimestamp(observed_ms / 1000, tz=UTC)
        stats = deltas.outcome(name, minute(observed_ms))
        config = w.monitoring or {}
        try:
            event = orjson.loads(message.value() or b"")
        except orjson.JSONDecodeError:
            stats.invalid += 1
            return
        value = (
            event.get(config.get("outcome_field") or "label") if isinstance(event, dict) else None
        )
        if value is None:
            stats.invalid += 1
            return
        rows = self._predictions_for(session, w, event, observed_at)
        if rows is None:
            stats.unmatched += 1
            return
        if not rows:
            stats.invalid += 1
            return
        if observed_at - max(r.predicted_at for r in rows) > w.window:
            stats.late += 1
            return
        stats.matched += 1
        for row in rows:
            self._join(session, w, row, value, observed_at, deltas)
            session.delete(row)

    def _predictions_for(
        self, session: Session, w: Watched, event: dict[str, Any], observed_at: datetime
    ) -> list[PendingPrediction] | None:
        """Every variant's prediction of the event this outcome is about; None if there is none."""
        if (w.monitoring or {}).get("join_by") == "source":
            try:
                source = (
                    str(event["source_topic"]),
                    int(event["source_partition"]),
                    int(event["source_offset"]),
                )
            except (KeyError, TypeError, ValueError):
                return []
            rows = session.scalars(
                select(PendingPrediction).where(
                    PendingPrediction.deployment == w.name,
                    PendingPrediction.source_topic == source[0],
                    PendingPrediction.source_partition == source[1],
                    PendingPrediction.source_offset == source[2],
                )
            ).all()
            return list(rows) or None
        key = event.get(w.key_field)
        if key is None:
            return []
        latest = session.scalars(
            select(PendingPrediction)
            .where(
                PendingPrediction.deployment == w.name,
                PendingPrediction.entity_key == str(key),
                PendingPrediction.predicted_at <= observed_at + CLOCK_SKEW,
            )
            .order_by(PendingPrediction.predicted_at.desc(), PendingPrediction.source_offset.desc())
            .limit(1)
        ).first()
        if latest is None:
            return None
        return list(
            session.scalars(
                select(PendingPrediction).where(
                    PendingPrediction.deployment == w.name,
                    PendingPrediction.source_topic == latest.source_topic,
                    PendingPrediction.source_partition == latest.source_partition,
                    PendingPrediction.source_offset == latest.source_offset,
                )
            )
        )

    def _join(
        self,
        session: Session,
        w: Watched,
        row: PendingPrediction,
        value: Any,
        observed_at: datetime,
        deltas: Deltas,
    ) -> None:
        task = w.task or ("binary" if isinstance(row.score, float | int) else "multiclass")
        correct: bool | None = None
        if task == "regression":
            observed = as_float(value)
            predicted = as_float(row.score)
            if observed is None or predicted is None:
                return
            score, outcome = predicted, observed
            error = predicted - observed
            d = deltas.variant(w.name, row.variant, minute(row.predicted_at.timestamp() * 1000))
            d.squared_error_sum += error * error
            d.absolute_error_sum += abs(error)
        elif task == "multiclass" and isinstance(row.score, list):
            classes = [_norm_label(c) for c in (w.label_classes or [])]
            observed_label = _norm_label(value)
            if observed_label not in classes:
                return
            index = classes.index(observed_label)
            score = float(row.score[index])
            outcome = float(index)
            correct = _norm_label(row.label) == observed_label
            d = deltas.variant(w.name, row.variant, minute(row.predicted_at.timestamp() * 1000))
            d.log_loss_sum += -math.log(min(max(score, 1e-15), 1.0))
        else:
            positive = _norm_label((w.label_classes or [0, 1])[-1])
            outcome = 1.0 if _norm_label(value) == positive else 0.0
            p = min(max(float(row.score), 1e-15), 1 - 1e-15)
            score = float(row.score)
            correct = (p >= 0.5) == (outcome == 1.0)
            d = deltas.variant(w.name, row.variant, minute(row.predicted_at.timestamp() * 1000))
            d.log_loss_sum += -(outcome * math.log(p) + (1 - outcome) * math.log(1 - p))
        d.outcomes += 1
        d.shadow = d.shadow or row.shadow
        if correct:
            d.correct += 1
        session.add(
            JoinedOutcome(
                deployment=w.name,
                variant=row.variant,
                shadow=row.shadow,
                model_version=row.model_version,
                score=score,
                outcome=outcome,
                correct=correct,
                predicted_at=row.predicted_at,
                observed_at=observed_at,
            )
        )

    # --- housekeeping ---------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Expire unjoined predictions past their window; raise drift alerts; apply policies."""
        self._last_housekeeping = time.monotonic()
        now = datetime.now(UTC)
        with self.sessions() as session, session.begin():
            for w in self.watched.values():
                if not w.outcomes_topic:
                    continue
                expired = session.execute(
                    delete(PendingPrediction)
                    .where(
                        PendingPrediction.deployment == w.name,
                        # Kept for a second window, so an outcome arriving then counts as late
                        # (not as unmatched).
                        PendingPrediction.predicted_at < now - 2 * w.window,
                    )
                    .returning(PendingPrediction.source_offset)
                ).all()
                if expired:
                    deltas = Deltas()
                    deltas.outcome(
                        w.name, minute(now.timestamp() * 1000)
                    ).expired_predictions += len(expired)
                    deltas.flush(session)
        try:
            from carrara.monitoring.alerts import check_alerts_and_policies

            with self.sessions() as session, session.begin():
                check_alerts_and_policies(session, self.settings, self.watched)
        except ImportError:
            pass
