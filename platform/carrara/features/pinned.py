"""A feature set as a model pinned it: its plan, rebuilt from the record the model carries.

Training stores the feature-set revision it used in the model's feature spec (its SQL, late
policy, allowed lateness and digest); scorers and the training run itself rebuild the plan from
that record with `pinned_plan`, so both compute exactly the definition the model was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from carrara.features.plan import FeaturePlan, FeatureSqlError, LatePolicy, OutputKind
from carrara.features.sql import parse_feature_sql


def pinned_plan(
    record: Mapping[str, Any],
    *,
    key_field: str,
    time_field: str | None,
    fields: Mapping[str, str],
    label_field: str | None = None,
    dataset: str | None = None,
) -> FeaturePlan:
    """The plan of a pinned feature-set record; `FeatureSqlError` when it cannot be computed.

    The record's digest must match its SQL and policy (the SQL is the definition), its outputs
    must be numbers (a model's derived columns are float64), and windows need the dataset's
    event time field (the record timestamp is not used for training yet).
    """
    revision = record.get("revision", record.get("number", "?"))
    plan = parse_feature_sql(
        str(record["sql"]),
        key_field=key_field,
        time_field=time_field,
        fields=fields,
        label_field=label_field,
        dataset=dataset,
        late_policy=LatePolicy(record.get("late_policy", "cap")),
        allowed_lateness_ms=int(record.get("allowed_lateness_ms", 0)),
    )
    if plan.digest != record.get("digest"):
        raise FeatureSqlError(f"feature-set revision {revision}: its digest does not match its SQL")
    categories = [o.name for o in plan.outputs if o.kind is OutputKind.category]
    if categories:
        raise FeatureSqlError(
            f"models use numeric derived features only; {', '.join(categories)} are categories "
            "(declare the field as a dataset feature instead)"
        )
    if not time_field:
        raise FeatureSqlError(
            "a feature set needs the dataset's event time field (windows over record timestamps "
            "are not built yet for training)"
        )
    return plan
