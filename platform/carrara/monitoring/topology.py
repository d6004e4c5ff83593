"""What the monitor reads: the role of each topic for the watched deployments, and where a newly
assigned partition starts (its offset stored in Postgres, else the deployment's creation time)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import structlog
from confluent_kafka import OFFSET_END, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    OffsetSpec,  # pyright: ignore[reportPrivateImportUsage]  (exported at runtime)
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from carrara.models import MonitorOffset
from carrara.monitoring.watched import Watched
from carrara.streams.client_config import admin_config

log = structlog.get_logger(__name__)


@dataclass
class Roles:
    """What a topic is to the monitor (one topic may be several things)."""

    predictions: bool = False
    dead_letters: set[str] = field(default_factory=set)  # deployments
    inputs: set[str] = field(default_factory=set)
    outcomes: set[str] = field(default_factory=set)
    since_ms: int = 0  # where a partition without a stored offset starts

    def __bool__(self) -> bool:
        return bool(self.predictions or self.dead_letters or self.inputs or self.outcomes)


def roles_of(watched: dict[str, Watched]) -> dict[str, Roles]:
    """Each topic the watched deployments need read, with its roles.

    Predictions and dead letters of every deployment; inputs of those with a training profile
    (for drift); outcomes of those with an outcomes topic.
    """
    roles: dict[str, Roles] = defaultdict(Roles)

    def role(topic: str, created_ms: int) -> Roles:
        r = roles[topic]
        r.since_ms = min(r.since_ms or created_ms, created_ms)
        return r

    for w in watched.values():
        role(w.output_topic, w.created_ms).predictions = True
        role(w.dead_letter_topic, w.created_ms).dead_letters.add(w.name)
        inputs = role(w.input_topic, w.created_ms)
        if w.profiles:
            inputs.inputs.add(w.name)
        if w.outcomes_topic:
            role(w.outcomes_topic, w.created_ms).outcomes.add(w.name)
    return {topic: r for topic, r in roles.items() if r}


def start_offsets(
    sessions: sessionmaker[Session],
    bootstrap: str,
    roles: dict[str, Roles],
    partitions: list[TopicPartition],
) -> None:
    """Set each partition's offset: the one stored in Postgres, or the deployment's start.

    A partition with no stored offset starts at the first record at or after its topic's
    `since_ms` (the end if there is none); if Kafka cannot say, at the consumer's default.
    """
    with sessions() as session:
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
            admin = AdminClient(admin_config(bootstrap))
            futures = admin.list_offsets(
                {
                    TopicPartition(tp.topic, tp.partition): OffsetSpec.for_timestamp(
                        roles.get(tp.topic, Roles()).since_ms
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
