"""The outcome join: an outcome meets every variant's prediction of the event it is about.

An outcome joins the latest prediction made for its entity key (or, with `join_by: source`, the
prediction of the exact input offset it names) — every variant's prediction of that event, shadow
ones included. An outcome arriving more than `window_s` after its prediction is counted late; one
with no prediction at all, unmatched; one without a usable value, invalid. Predictions still
unjoined after two windows are removed and counted as expired (the second window is what lets a
late outcome be recognised as late rather than unmatched).

An outcome read before its own prediction (after a restart, or while the prediction topic lags)
is held, its partition not advanced, for up to OUTCOME_GRACE before it counts as unmatched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from confluent_kafka import Message
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from carrara.models import JoinedOutcome, PendingPrediction
from carrara.monitoring.aggregates import Deltas, as_float, minute
from carrara.monitoring.watched import Watched

# Clocks of scorers and outcome producers differ a little: an outcome may carry a timestamp
# slightly before its prediction's.
CLOCK_SKEW = timedelta(seconds=5)
# How long an outcome whose prediction has not been read yet waits before it counts as unmatched.
OUTCOME_GRACE = timedelta(seconds=30)


def too_early(session: Session, message: Message, w: Watched) -> bool:
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
    return predictions_for(session, w, event, observed_at) is None


def join_outcome(session: Session, message: Message, w: Watched, deltas: Deltas) -> None:
    """Count an outcome (matched, late, unmatched or invalid) and join it if it matched."""
    observed_ms = message.timestamp()[1]
    observed_at = datetime.fromtimestamp(observed_ms / 1000, tz=UTC)
    stats = deltas.outcome(w.name, minute(observed_ms))
    try:
        event = orjson.loads(message.value() or b"")
    except orjson.JSONDecodeError:
        stats.invalid += 1
        return
    value = event.get(w.config.outcome_field) if isinstance(event, dict) else None
    if value is None:
        stats.invalid += 1
        return
    rows = predictions_for(session, w, event, observed_at)
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
        _record_join(session, w, row, value, observed_at, deltas)
        session.delete(row)


def predictions_for(
    session: Session, w: Watched, event: dict[str, Any], observed_at: datetime
) -> list[PendingPrediction] | None:
    """Every variant's prediction of the event this outcome is about; None if there is none."""
    if w.config.join_by == "source":
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


def norm_label(value: Any) -> str:
    """A label as text, so 1, 1.0, True and "1" are the same class."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True, slots=True)
class Judged:
    """One prediction judged against its observed outcome."""

    task: str
    score: float  # regression: the prediction; multiclass: P(observed class); else P(positive)
    outcome: float  # regression: the observed value; multiclass: class index; else 0/1
    correct: bool | None  # None for regression
    log_loss: float | None  # classification only
    error: float | None  # regression only: prediction - observed


def judge(
    task: str | None, label_classes: list[Any] | None, score: Any, label: Any, value: Any
) -> Judged | None:
    """Judge a prediction (`score`, predicted `label`) by the observed `value`; None if unusable.

    A model of unknown task is judged as a binary classifier for a numeric score, multiclass for
    a list of class probabilities.
    """
    task = task or ("binary" if isinstance(score, float | int) else "multiclass")
    if task == "regression":
        observed = as_float(value)
        predicted = as_float(score)
        if observed is None or predicted is None:
            return None
        return Judged(task, predicted, observed, None, None, predicted - observed)
    if task == "multiclass" and isinstance(score, list):
        classes = [norm_label(c) for c in (label_classes or [])]
        observed_label = norm_label(value)
        if observed_label not in classes:
            return None
        index = classes.index(observed_label)
        p = float(score[index])
        loss = -math.log(min(max(p, 1e-15), 1.0))
        return Judged(task, p, float(index), norm_label(label) == observed_label, loss, None)
    positive = norm_label((label_classes or [0, 1])[-1])
    outcome = 1.0 if norm_label(value) == positive else 0.0
    p = min(max(float(score), 1e-15), 1 - 1e-15)
    loss = -(outcome * math.log(p) + (1 - outcome) * math.log(1 - p))
    return Judged(task, float(score), outcome, (p >= 0.5) == (outcome == 1.0), loss, None)


def _record_join(
    session: Session,
    w: Watched,
    row: PendingPrediction,
    value: Any,
    observed_at: datetime,
    deltas: Deltas,
) -> None:
    judged = judge(w.task, w.label_classes, row.score, row.label, value)
    if judged is None:
        return
    d = deltas.variant(w.name, row.variant, minute(row.predicted_at.timestamp() * 1000))
    if judged.error is not None:
        d.squared_error_sum += judged.error * judged.error
        d.absolute_error_sum += abs(judged.error)
    if judged.log_loss is not None:
        d.log_loss_sum += judged.log_loss
    d.outcomes += 1
    d.shadow = d.shadow or row.shadow
    if judged.correct:
        d.correct += 1
    session.add(
        JoinedOutcome(
            deployment=w.name,
            variant=row.variant,
            shadow=row.shadow,
            model_version=row.model_version,
            score=judged.score,
            outcome=judged.outcome,
            correct=judged.correct,
            predicted_at=row.predicted_at,
            observed_at=observed_at,
        )
    )


def expire_pending(session: Session, watched: dict[str, Watched], now: datetime) -> None:
    """Remove predictions unjoined for two windows, counted as expired."""
    for w in watched.values():
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
            deltas.outcome(w.name, minute(now.timestamp() * 1000)).expired_predictions += len(
                expired
            )
            deltas.flush(session)
