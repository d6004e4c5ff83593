"""The monitor's own consumer offsets in Postgres (`monitor_offsets`), written in the transaction
of the aggregates they produced: a record is applied exactly once, across restarts and rebalances.
"""

from __future__ import annotations

from confluent_kafka import Message
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from carrara.models import MonitorOffset
from carrara.streams.consumed import position


def unseen(session: Session, messages: list[Message]) -> list[Message]:
    """Lock the batch's offset rows; drop records an earlier transaction already applied."""
    positions = [position(m) for m in messages]
    stored = {
        (row.topic, row.partition): row.next_offset
        for row in session.scalars(
            select(MonitorOffset)
            .where(MonitorOffset.topic.in_({t for t, _, _ in positions}))
            .with_for_update()
        )
    }
    return [
        m
        for m, (topic, partition, offset) in zip(messages, positions, strict=True)
        if offset >= stored.get((topic, partition), -1)
    ]


def store_offsets(
    session: Session, messages: list[Message], blocked: dict[tuple[str, int], int]
) -> None:
    """Store the next offset of each partition of the batch (a held outcome's own, if blocked)."""
    nexts: dict[tuple[str, int], int] = {}
    for m in messages:
        topic, partition, offset = position(m)
        nexts[(topic, partition)] = max(nexts.get((topic, partition), 0), offset + 1)
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
