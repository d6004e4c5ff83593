"""A training run's derived features: the dataset's feature set, computed by the operator that
scorers run (`carrara.features.operator`), over a replay warmed from the horizon before the
snapshot.

The records in `[warm_start, start)` of each partition (`streams.warmup`) only build state; rows are
emitted for the snapshot's events only, aligned with the decoded events of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from carrara.features.operator import PartitionedOperator, process_rows
from carrara.features.pinned import pinned_plan
from carrara.features.plan import FeaturePlan, FeatureSqlError, decoded_fields


class FeatureSetError(ValueError):
    """The run's feature set cannot be computed (a message for the run's error)."""


@dataclass
class DerivedFeatures:
    plan: FeaturePlan
    matrix: np.ndarray  # (rows, outputs) float64, NaN = NULL
    warmup: list[dict[str, int]]  # the ranges read only to warm the state
    warmup_events: int
    late_events: int


def plan_of(feature_set: dict[str, Any], schema: dict[str, Any], dataset: str) -> FeaturePlan:
    """The plan of a run's pinned feature-set revision (re-parsed: the SQL is the definition)."""
    try:
        return pinned_plan(
            feature_set,
            key_field=schema["key_field"],
            time_field=schema.get("event_time_field"),
            fields={f["name"]: f["type"] for f in schema["features"]},
            label_field=schema.get("label_field"),
            dataset=dataset,
        )
    except FeatureSqlError as exc:
        raise FeatureSetError(str(exc)) from exc


def run_operator(
    plan: FeaturePlan, operator: PartitionedOperator, decoded: Any
) -> tuple[np.ndarray, int]:
    """Process decoded events in their replay order: their features as a matrix, and how many
    were late."""
    if decoded.rows == 0:
        return np.full((0, len(plan.outputs)), np.nan), 0
    return process_rows(
        operator.of,
        plan,
        decoded.partitions,
        decoded.keys,
        decoded.event_times,
        decoded_fields(decoded),
    )


def derive(
    plan: FeaturePlan,
    warm: Any | None,
    warm_ranges: list[dict[str, int]],
    decoded: Any,
) -> DerivedFeatures:
    """The warm-up events build state; the snapshot's events get rows (aligned with `decoded`)."""
    operator = PartitionedOperator(plan)
    warm_events = 0
    if warm is not None:
        run_operator(plan, operator, warm)
        warm_events = warm.rows
    matrix, late = run_operator(plan, operator, decoded)
    return DerivedFeatures(plan, matrix, warm_ranges, warm_events, late)


def feature_set_record(feature_set: dict[str, Any], derived: DerivedFeatures) -> dict[str, Any]:
    """What the model version keeps of its feature set (in the feature spec and MLflow)."""
    return {
        "revision": feature_set["number"],
        "digest": feature_set["digest"],
        "sql": feature_set["sql"],
        "late_policy": feature_set.get("late_policy", "cap"),
        "allowed_lateness_ms": int(feature_set.get("allowed_lateness_ms", 0)),
        "horizon_ms": derived.plan.horizon_ms,
        "outputs": derived.plan.describe(),
    }
