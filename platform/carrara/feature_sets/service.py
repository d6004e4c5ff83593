"""Feature sets: a dataset's derived features in SQL, stored as audited, numbered revisions.

The SQL is parsed with the dataset's key, event time, declared fields and label
(`carrara.features.sql`), so a revision is stored only when every scorer and training run can
compute it; a parse error is a 422 naming the construct and its line and column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from carrara.audit.service import record
from carrara.auth.principal import Principal
from carrara.datasets.service import KAFKA_TIMEOUT, get_dataset
from carrara.errors import Conflict, Invalid, NotFound, Unavailable
from carrara.feature_sets.schemas import FeaturePreviewIn, FeatureSetPut
from carrara.features import duck
from carrara.features.duck import LogEvent
from carrara.features.operator import PartitionedOperator, event_time_ms
from carrara.features.plan import FeaturePlan, FeatureSqlError, LatePolicy
from carrara.features.sql import parse_feature_sql
from carrara.models import Dataset, FeatureSetRevision
from carrara.streams.event_schema import REGISTRY_FORMATS, decode_event
from carrara.streams.snapshot import TopicNotFound, read_recent_events

PREVIEW_NOTE = (
    "computed over these events only, in log order per partition: windows do not see older events"
)


def plan_for(
    dataset: Dataset,
    sql: str,
    late_policy: LatePolicy = LatePolicy.cap,
    allowed_lateness_ms: int = 0,
) -> FeaturePlan:
    """The plan of `sql` over `dataset`, or Invalid (422) with the parser's precise message."""
    fields = {f["name"]: f["type"] for f in dataset.features}
    try:
        return parse_feature_sql(
            sql,
            key_field=dataset.key_field,
            time_field=dataset.event_time_field,
            fields=fields,
            label_field=dataset.label_field,
            dataset=dataset.name,
            late_policy=late_policy,
            allowed_lateness_ms=allowed_lateness_ms,
        )
    except FeatureSqlError as exc:
        raise Invalid(
            f"the feature SQL is not supported: {exc}", errors=[{"field": "sql", **exc.as_dict()}]
        ) from exc


def revision_plan(dataset: Dataset, revision: FeatureSetRevision) -> FeaturePlan:
    return plan_for(
        dataset, revision.sql, LatePolicy(revision.late_policy), revision.allowed_lateness_ms
    )


def as_audit(revision: FeatureSetRevision) -> dict[str, Any]:
    return {
        "number": revision.number,
        "sql": revision.sql,
        "late_policy": revision.late_policy,
        "allowed_lateness_ms": revision.allowed_lateness_ms,
        "digest": revision.digest,
        "outputs": [o["name"] for o in revision.outputs],
    }


def list_revisions(session: Session, dataset: Dataset) -> list[FeatureSetRevision]:
    """The dataset's feature-set revisions, newest first."""
    return list(
        session.scalars(
            select(FeatureSetRevision)
            .where(FeatureSetRevision.dataset_id == dataset.id)
            .order_by(FeatureSetRevision.number.desc())
        )
    )


def current_revision(session: Session, dataset: Dataset) -> FeatureSetRevision | None:
    return session.scalar(
        select(FeatureSetRevision)
        .where(FeatureSetRevision.dataset_id == dataset.id)
        .order_by(FeatureSetRevision.number.desc())
        .limit(1)
    )


def get_revision(session: Session, name: str, number: int | None) -> FeatureSetRevision:
    """Revision `number` (None: the current one) of dataset `name`'s feature set."""
    dataset = get_dataset(session, name)
    if number is None:
        revision = current_revision(session, dataset)
        if revision is None:
            raise NotFound(f"dataset '{name}' has no feature set")
        return revision
    revision = session.scalar(
        select(FeatureSetRevision).where(
            FeatureSetRevision.dataset_id == dataset.id, FeatureSetRevision.number == number
        )
    )
    if revision is None:
        raise NotFound(f"dataset '{name}' has no feature-set revision {number}")
    return revision


@dataclass(frozen=True)
class Applied:
    revision: FeatureSetRevision
    changed: bool  # False: the same definition as the current revision; nothing stored


def put_feature_set(
    session: Session, name: str, data: FeatureSetPut, principal: Principal
) -> Applied:
    """Store the SQL as the next revision (unchanged definitions are not stored twice)."""
    dataset = get_dataset(session, name)
    plan = plan_for(dataset, data.sql, data.late_policy, data.allowed_lateness_ms)
    # Concurrent PUTs take numbers one after the other.
    session.execute(select(Dataset.id).where(Dataset.id == dataset.id).with_for_update())
    current = current_revision(session, dataset)
    if current is not None and current.digest == plan.digest:
        return Applied(current, changed=False)
    number = (
        session.scalar(
            select(func.max(FeatureSetRevision.number)).where(
                FeatureSetRevision.dataset_id == dataset.id
            )
        )
        or 0
    ) + 1
    revision = FeatureSetRevision(
        dataset_id=dataset.id,
        number=number,
        sql=data.sql,
        late_policy=plan.late_policy.value,
        allowed_lateness_ms=plan.allowed_lateness_ms,
        digest=plan.digest,
        outputs=plan.describe(),
        horizon_ms=plan.horizon_ms,
        reason=data.reason,
        created_by=principal.name,
    )
    try:
        with session.begin_nested():
            session.add(revision)
    except IntegrityError as exc:
        raise Conflict(f"feature-set revision {number} of '{name}' was taken; retry") from exc
    record(
        session,
        principal,
        "dataset.features.update",
        "dataset",
        name,
        before=None if current is None else as_audit(current),
        after=as_audit(revision),
        detail=data.reason,
    )
    return Applied(revision, changed=True)


@dataclass
class PreviewRow:
    partition: int
    offset: int
    key: str | None
    time_ms: int | None
    late: bool
    features: dict[str, Any] | None
    problem: str | None = None


@dataclass
class Preview:
    dataset: Dataset
    revision: int | None
    plan: FeaturePlan
    rows: list[PreviewRow]


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v


def preview(session: Session, bootstrap: str, name: str, data: FeaturePreviewIn) -> Preview:
    """The features of the newest `data.events` events of the topic, through the operator."""
    dataset = get_dataset(session, name)
    if data.sql is not None:
        plan = plan_for(
            dataset, data.sql, data.late_policy or LatePolicy.cap, data.allowed_lateness_ms or 0
        )
        number = None
    else:
        revision = get_revision(session, name, None)
        plan = revision_plan(dataset, revision)
        number = revision.number
    if dataset.format in REGISTRY_FORMATS:
        raise Invalid(
            f"previews read JSON events; dataset '{name}' is {dataset.format} (not built yet)"
        )
    try:
        events = read_recent_events(bootstrap, dataset.topic, data.events, KAFKA_TIMEOUT)
    except TopicNotFound as exc:
        raise Conflict(f"topic '{dataset.topic}' no longer exists in Kafka") from exc
    except KafkaException as exc:
        raise Unavailable(f"Kafka at {bootstrap} did not answer: {exc.args[0]}") from exc
    events.sort(key=lambda e: (e.partition, e.offset))  # log order per partition
    rows: list[PreviewRow | None] = []
    computable: list[tuple[int, LogEvent]] = []
    for event in events:
        decoded = decode_event(event.value)
        problem = None
        key = time_ms = None
        if isinstance(decoded, str):
            problem = f"the record is {decoded}"
        else:
            raw_key = decoded.get(dataset.key_field)
            key = None if raw_key is None else str(raw_key)
            time_ms = (
                event_time_ms(decoded.get(dataset.event_time_field))
                if dataset.event_time_field
                else event.timestamp_ms
            )
            if key is None:
                problem = f"no key ('{dataset.key_field}')"
            elif time_ms is None:
                problem = "no event time" + (
                    f" ('{dataset.event_time_field}')" if dataset.event_time_field else ""
                )
        if problem is not None or key is None or time_ms is None or isinstance(decoded, str):
            row = PreviewRow(event.partition, event.offset, key, time_ms, False, None, problem)
            rows.append(row)
            continue
        computable.append((len(rows), LogEvent(event.partition, key, time_ms, decoded)))
        rows.append(None)
    log = [e for _, e in computable]
    if data.engine == "duckdb":
        try:
            results = duck.compute(plan, log)
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
    else:
        operator = PartitionedOperator(plan)
        results = [operator.process(e.partition, e.key, e.time_ms, e.fields) for e in log]
    for (index, event), result in zip(computable, results, strict=True):
        offset = events[index].offset
        features = {n: _json_value(v) for n, v in zip(plan.names, result.values, strict=True)}
        rows[index] = PreviewRow(
            event.partition, offset, event.key, result.time_ms, result.late, features
        )
    return Preview(dataset, number, plan, [r for r in rows if r is not None])
