"""A scorer's feature-set state: per input partition, restored from and written to a changelog.

A model trained with a feature set (README: Features in SQL) scores on the features the reference
operator (`carrara.features.operator`) computes from the key's earlier events. A deployment's loop
keeps one operator per (feature set, input partition) it owns:

- **Computed in the micro-batch**, over every decodable event of the batch in log order (whichever
  variant it is routed to), before the model; the same loop training replay runs
  (`features.operator.process_rows`).
- **Changelog**: the keys whose state a batch changed are written to a compacted topic, one per
  deployment and feature set (`changelog_topic`), partition for partition with the input, as part
  of the batch's output. In exactly-once mode they are in the batch's transaction with the
  predictions and the input offsets, so the changelog (read `read_committed`) always holds the
  state as of the committed input offsets. The topic is per deployment, not only per feature set,
  because state is tied to one consumer group's offsets (Kafka Streams names changelogs after the
  application for the same reason).
- **Restore**: a partition's operator is built from its changelog the first time a batch needs it
  after the partition was assigned, and after anything that rewinds the input (an aborted
  transaction, rebuilt clients): the in-memory state is dropped then, since it may hold events
  that will be delivered again.
- **Expiry**: keys idle longer than the feature set's horizon are forgotten (a tombstone in the
  changelog), so state stays bounded by the longest window.

At-least-once delivery writes the changelog before it commits the input offsets: after a crash
between the two, the events come again while the restored state already holds them. Each key's
state records the offset of its last event, so those events are not stored twice; their rows are
computed from the state as it is (the same row when the event was its key's last one, which is the
usual case). Exactly-once delivery has no such window.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from carrara.features.operator import FeatureOperator, process_rows
from carrara.features.pinned import pinned_plan
from carrara.features.plan import FeaturePlan
from carrara.scoring import metrics
from carrara.streams.event_codec import FeatureSpec
from carrara.streams.replay import replay_config

log = structlog.get_logger(__name__)

# How often a loop expires idle keys and refreshes the state gauges.
EXPIRE_EVERY_S = 10.0


def changelog_topic(deployment: str, digest: str) -> str:
    """The compacted topic holding `deployment`'s state of the feature set with `digest`."""
    return f"carrara.features.{deployment}.{digest[:16]}.changelog"[:249]


def feature_plan(spec: FeatureSpec) -> FeaturePlan | None:
    """The plan of the feature set a model was trained with (None: raw fields only).

    Raises `FeatureSqlError` when it cannot be computed here; the reconciler then rejects the
    revision and the previous one keeps serving.
    """
    if not spec.feature_set:
        return None
    schema = spec.schema
    fields = tuple((f.name, str(f.type)) for f in schema.features)
    record = spec.feature_set
    return _plan(
        str(record.get("sql", "")),
        str(record.get("digest", "")),
        str(record.get("late_policy", "cap")),
        int(record.get("allowed_lateness_ms", 0)),
        schema.key_field,
        schema.event_time_field,
        fields,
        schema.label_field,
    )


@lru_cache(maxsize=64)
def _plan(
    sql: str,
    digest: str,
    late_policy: str,
    allowed_lateness_ms: int,
    key_field: str,
    time_field: str | None,
    fields: tuple[tuple[str, str], ...],
    label_field: str | None,
) -> FeaturePlan:
    return pinned_plan(
        {
            "sql": sql,
            "digest": digest,
            "late_policy": late_policy,
            "allowed_lateness_ms": allowed_lateness_ms,
        },
        key_field=key_field,
        time_field=time_field,
        fields=dict(fields),
        label_field=label_field,
    )


class FeatureStore:
    """The feature-set state of one deployment's loop (one per consumer/producer generation)."""

    def __init__(
        self,
        deployment: str,
        bootstrap: str,
        *,
        restore_timeout_s: float = 60.0,
    ) -> None:
        self.deployment = deployment
        self.bootstrap = bootstrap
        self.restore_timeout_s = restore_timeout_s
        self._operators: dict[tuple[str, int], FeatureOperator] = {}
        self._topics: dict[str, str] = {}  # digest -> changelog topic
        self._consumer: Consumer | None = None
        self._last_expiry = time.monotonic()

    # --- the micro-batch ------------------------------------------------------------------------

    def derive(
        self,
        plan: FeaturePlan,
        partitions: Sequence[int] | np.ndarray,
        keys: Sequence[Any],
        times: Sequence[float] | np.ndarray,
        fields_of: Callable[[int], Mapping[str, Any]],
        offsets: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The feature-set columns of a batch's decoded rows, in log order (state updated)."""
        digest = plan.digest
        self._topics.setdefault(digest, changelog_topic(self.deployment, digest))

        def operator_of(partition: int) -> FeatureOperator:
            op = self._operators.get((digest, partition))
            if op is None:
                op = self._operators[(digest, partition)] = self._restore(plan, partition)
            return op

        matrix, _late = process_rows(operator_of, plan, partitions, keys, times, fields_of, offsets)
        return matrix

    def changelog(self) -> list[tuple[str, int, bytes, bytes | None]]:
        """The state changes since the last call: (topic, partition, key, state or None)."""
        self._maybe_expire()
        records: list[tuple[str, int, bytes, bytes | None]] = []
        for (digest, partition), op in self._operators.items():
            if not op.changed:
                continue
            topic = self._topics[digest]
            changes = op.take_changes()
            records.extend(
                (topic, partition, str(key).encode(), data) for key, data in changes.items()
            )
            metrics.FEATURE_CHANGELOG_RECORDS.labels(self.deployment, digest[:16]).inc(len(changes))
        return records

    # --- ownership ------------------------------------------------------------------------------

    def drop(self, partitions: Sequence[int]) -> None:
        """Forget the state of revoked partitions (their next owner restores it)."""
        gone = set(partitions)
        for entry in [e for e in self._operators if e[1] in gone]:
            del self._operators[entry]
            metrics.FEATURE_STATE_KEYS.remove_by_labels(
                {"deployment": self.deployment, "partition": str(entry[1])}
            )

    def reset(self) -> None:
        """Forget every partition's state: the input was rewound, restore from the changelogs."""
        self._operators.clear()

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    # --- restore and expiry ---------------------------------------------------------------------

    def _restore(self, plan: FeaturePlan, partition: int) -> FeatureOperator:
        """A partition's operator, loaded from its changelog's committed records."""
        started = time.perf_counter()
        op = FeatureOperator(plan)
        topic = self._topics[plan.digest]
        # Millions of small containers: the cyclic GC would scan them again and again while they
        # are made (5x the restore time), and at every full collection after. They hold no
        # cycles, so collection pauses while they load and they are frozen out of its scans.
        gc.disable()
        try:
            op.restore(self._read_changelog(topic, partition))
        finally:
            gc.enable()
            gc.freeze()
        seconds = time.perf_counter() - started
        metrics.FEATURE_RESTORE_SECONDS.labels(self.deployment, plan.digest[:16]).observe(seconds)
        log.info(
            "restored feature state",
            deployment=self.deployment,
            feature_set=plan.digest[:16],
            partition=partition,
            keys=len(op.keys),
            seconds=round(seconds, 3),
        )
        return op

    def _read_changelog(self, topic: str, partition: int) -> Iterator[tuple[str, bytes | None]]:
        consumer = self._restore_consumer()
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10, cached=False
            )
        except KafkaException:
            # Unknown to this client: ask the broker. A changelog that does not exist holds
            # nothing (the reconciler creates it before the loop starts); one that does (stale
            # metadata) is read below, never skipped.
            found = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if found is None or found.error is not None or partition not in found.partitions:
                return
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10, cached=False
            )
        if high <= low:
            return  # empty: nothing to wait for
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        deadline = time.monotonic() + self.restore_timeout_s
        try:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"restoring {topic}[{partition}] took over {self.restore_timeout_s} s"
                    )
                # A short wait: `consume` returns early only with a full batch (or at the end).
                for message in consumer.consume(10_000, timeout=0.05):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            return
                        if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                            return  # nothing written yet (the topic is created on deploy)
                        raise KafkaException(error)
                    key = message.key()
                    if key is not None:
                        yield key.decode(), message.value()
        finally:
            consumer.unassign()

    def _restore_consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(
                replay_config(self.bootstrap, **{"isolation.level": "read_committed"})
            )
        return self._consumer

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry < EXPIRE_EVERY_S:
            return
        self._last_expiry = now
        for (digest, partition), op in self._operators.items():
            op.expire()
            labels = (self.deployment, digest[:16], str(partition))
            metrics.FEATURE_STATE_KEYS.labels(*labels).set(len(op.keys))
            metrics.FEATURE_STATE_BYTES.labels(*labels).set(_estimated_bytes(op))


def _estimated_bytes(op: FeatureOperator, sample: int = 1000) -> float:
    """The state's serialised size, estimated from up to `sample` keys (exact below that)."""
    n = len(op.keys)
    if n <= sample:
        return float(op.state_bytes())
    step = n // sample
    sizes = [len(state.to_bytes()) for state in list(op.keys.values())[::step][:sample]]
    return float(np.mean(sizes)) * n
