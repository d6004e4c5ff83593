"""The deployment edit form: its variant rows as the `PUT` body, a challenger added, and the diff
between the current spec and the one to confirm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from carrara.deployments.schemas import MonitoringConfig
from carrara.ui.forms import FORM, checked, human_message, optional, text

MAX_VARIANT_ROWS = 10


def variant_rows(form: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The variant rows of a deployment form (`variants-N-<field>`); empty rows are skipped."""
    rows = []
    for i in range(MAX_VARIANT_ROWS):
        prefix = f"variants-{i}-"
        name, model = text(form, prefix + "name"), text(form, prefix + "model")
        if not name and not model:
            continue
        version_or_alias = text(form, prefix + "version")
        shadow = checked(form, prefix + "shadow")
        row: dict[str, Any] = {"name": name, "model": model, "shadow": shadow}
        if version_or_alias.isdigit():
            row["version"] = int(version_or_alias)
        elif version_or_alias:
            row["alias"] = version_or_alias
        weight = text(form, prefix + "weight") or "0"
        row["weight"] = int(weight) if weight.lstrip("-").isdigit() else weight
        sample = text(form, prefix + "shadow_sample_pct")
        if shadow and sample:
            row["shadow_sample_pct"] = sample
        rows.append(row)
    return rows


# Text inputs of the deployment form and their limits (the API's), checked before the body is.
TEXT_LIMITS = {
    "name": 100,
    "input_topic": 249,
    "output_topic": 249,
    "key_field": 200,
    "pool": 100,
    "description": 2000,
    "reason": 500,
    "outcomes_topic": 249,
    "outcome_field": 200,
    **{f"variants-{i}-name": 100 for i in range(MAX_VARIANT_ROWS)},
    **{f"variants-{i}-model": 200 for i in range(MAX_VARIANT_ROWS)},
    **{f"variants-{i}-version": 100 for i in range(MAX_VARIANT_ROWS)},
}
VARIANT_LABELS = {
    "name": "name",
    "model": "model",
    "version": "version or alias",
    "alias": "version or alias",
    "weight": "weight",
    "shadow_sample_pct": "shadow sample",
}
# Errors of the whole spec, put on the input they are about.
_SPEC_RULES = (
    (
        "input_topic and output_topic must differ",
        "output_topic",
        "must differ from the input topic",
    ),
    (
        "monitoring.outcomes_topic must differ",
        "outcomes_topic",
        "must differ from the output topic",
    ),
    ("weights of live variants", "variants", None),
    ("variant names must be unique", "variants", None),
    ("at least one variant must be live", "variants", None),
    ("monitoring.champion", "variants", None),
)


def variant_rows_index(form: Mapping[str, Any]) -> list[int]:
    """The form row (0-based) of each variant `variant_rows` returns, in order."""
    return [
        i
        for i in range(MAX_VARIANT_ROWS)
        if text(form, f"variants-{i}-name") or text(form, f"variants-{i}-model")
    ]


def deployment_errors(exc: ValidationError, form: Mapping[str, Any]) -> dict[str, str]:
    """The `PUT` body's validation errors on the deployment form's inputs, in words.

    A variant's error goes on its row's input (`variants-N-field`) and says "Variant N+1",
    counted as the form numbers its rows, never a zero-based index of the body.
    """
    rows = variant_rows_index(form)
    errors: dict[str, str] = {}
    for error in exc.errors():
        loc = [part for part in error.get("loc", ()) if part != "body"]
        message = human_message(error)
        if not loc:
            for needle, key, text_ in _SPEC_RULES:
                if needle in message:
                    errors.setdefault(key, text_ or message)
                    break
            else:
                errors.setdefault(FORM, message)
            continue
        head = str(loc[0])
        if head == "variants" and len(loc) >= 2 and isinstance(loc[1], int):
            row = rows[loc[1]] if loc[1] < len(rows) else loc[1]
            field_ = str(loc[2]) if len(loc) > 2 else "name"
            field_ = "version" if field_ == "alias" else field_
            label = VARIANT_LABELS.get(field_, field_.replace("_", " "))
            errors.setdefault(f"variants-{row}-{field_}", f"Variant {row + 1} {label}: {message}")
        elif head == "variants":
            errors.setdefault("variants", "add at least one variant (a name and a model)")
        elif head == "monitoring":
            sub = str(loc[1]) if len(loc) > 1 else ""
            key = sub if sub in ("outcomes_topic", "outcome_field", "join_by") else "monitoring"
            errors.setdefault(key, message)
        else:
            errors.setdefault(head, message)
    return errors


def deployment_body(
    form: Mapping[str, Any], current: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The body of `PUT /api/v1/deployments/{name}` from the create or edit form.

    Settings the form does not show (monitoring metric, champion, alpha, policy, the output format,
    `include_features`) are kept from the current spec, so changing weights never drops them.
    """
    current = current or {}
    body: dict[str, Any] = {
        "input_topic": text(form, "input_topic"),
        "output_topic": text(form, "output_topic"),
        "key_field": text(form, "key_field"),
        "pool": text(form, "pool") or "default",
        "description": text(form, "description"),
        "variants": variant_rows(form),
        "reason": text(form, "reason"),
    }
    monitoring = dict(current.get("monitoring") or {})
    outcomes = optional(form, "outcomes_topic")
    if outcomes is not None:
        monitoring["outcomes_topic"] = outcomes
        defaults = MonitoringConfig()
        monitoring["outcome_field"] = text(form, "outcome_field") or defaults.outcome_field
        monitoring["join_by"] = text(form, "join_by") or defaults.join_by
    elif "outcomes_topic" in form:  # the field was shown and left empty: no outcome join
        monitoring.pop("outcomes_topic", None)
    if monitoring:
        body["monitoring"] = monitoring
    if current.get("policy") is not None:
        body["policy"] = current["policy"]
    # Settings the form does not show are kept too (an edit must not turn them off).
    for kept in ("output_format", "include_features"):
        if current.get(kept) is not None:
            body[kept] = current[kept]
    return body


def with_challenger(
    variants: list[dict[str, Any]], name: str, model: str, version: int | None, weight: int = 10
) -> list[dict[str, Any]]:
    """`variants` plus a challenger taking `weight`% from the live variant with the most traffic."""
    rows = [dict(v) for v in variants]
    live = [v for v in rows if not v.get("shadow")]
    if live:
        donor = max(live, key=lambda v: v.get("weight", 0))
        donor["weight"] = max(0, int(donor.get("weight", 0)) - weight)
    rows.append(
        {"name": name, "model": model, "version": version, "weight": weight, "shadow": False}
    )
    return rows


@dataclass
class VariantChange:
    """One variant in a before/after comparison of two specs."""

    name: str
    change: str  # added | removed | changed | unchanged
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    changed_fields: list[str] = field(default_factory=list)


@dataclass
class SpecDiff:
    """What a new revision changes: variants side by side, and other changed settings."""

    variants: list[VariantChange]
    settings: list[tuple[str, Any, Any]]  # (setting, before, after)

    @property
    def empty(self) -> bool:
        return not self.settings and all(v.change == "unchanged" for v in self.variants)


VARIANT_FIELDS = ("model", "version", "weight", "shadow", "shadow_sample_pct")
SPEC_SETTINGS = (
    "input_topic",
    "output_topic",
    "key_field",
    "pool",
    "description",
    "monitoring",
    "policy",
)


def spec_diff(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> SpecDiff:
    """The differences between two stored specs (before may be None: a first revision)."""
    before = before or {}
    old = {v["name"]: v for v in before.get("variants", [])}
    new = {v["name"]: v for v in after.get("variants", [])}
    variants = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None:
            variants.append(VariantChange(name, "added", None, b))
        elif b is None:
            variants.append(VariantChange(name, "removed", a, None))
        else:
            fields = [f for f in VARIANT_FIELDS if a.get(f) != b.get(f)]
            variants.append(VariantChange(name, "changed" if fields else "unchanged", a, b, fields))
    settings = [
        (key, before.get(key), after.get(key))
        for key in SPEC_SETTINGS
        if before.get(key) != after.get(key)
    ]
    return SpecDiff(variants, settings)
