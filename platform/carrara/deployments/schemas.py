"""Pydantic I/O models of the deployments API: the desired state, revisions, rollback."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carrara.registry.schemas import ALIAS_PATTERN, MAX_VERSION, MODEL_NAME_PATTERN

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}$"
# The characters Kafka allows in a topic name.
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
MAX_VARIANTS = 10
MONITORING_METRICS = ("log_loss", "accuracy", "rmse", "mae")
MAX_OUTCOME_WINDOW_S = 30 * 86400

TopicName = Annotated[str, Field(pattern=TOPIC_PATTERN, max_length=249)]
Reason = Annotated[
    str, Field(max_length=500, description="Why: shown in the revision history and audit log")
]


class VariantIn(BaseModel):
    """A model version taking a share of the traffic, or shadowing it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=100, description="Variant name, e.g. `a`")
    model: str = Field(
        pattern=MODEL_NAME_PATTERN, max_length=200, description="Registered model name"
    )
    version: int | None = Field(
        default=None, ge=1, le=MAX_VERSION, description="Model version (or give `alias`)"
    )
    alias: str | None = Field(
        default=None,
        pattern=ALIAS_PATTERN,
        max_length=100,
        description="Model alias, resolved to a version when the deployment is applied",
    )
    weight: int = Field(
        default=0,
        ge=0,
        le=100,
        description=(
            "Percent of the live traffic. The weights of live (non-shadow) variants sum to "
            "exactly 100; shadow variants must have weight 0 (they score a copy of the traffic "
            "and their predictions are never the answer)."
        ),
    )
    shadow: bool = Field(default=False, description="Score a copy of the traffic, silently")
    shadow_sample_pct: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Shadow variants only: percent of events to score (default 100)",
    )

    @model_validator(mode="after")
    def _check(self) -> VariantIn:
        if (self.version is None) == (self.alias is None):
            raise ValueError(f"variant '{self.name}': give exactly one of `version` or `alias`")
        if self.shadow and self.weight != 0:
            raise ValueError(
                f"variant '{self.name}': a shadow variant takes no live traffic, its weight "
                f"must be 0 (got {self.weight})"
            )
        if not self.shadow and self.shadow_sample_pct is not None:
            raise ValueError(f"variant '{self.name}': shadow_sample_pct is for shadow variants")
        return self


class MonitoringConfig(BaseModel):
    """How the monitor judges a deployment: outcomes to join, the verdict metric, drift bound."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    outcomes_topic: TopicName | None = Field(
        default=None, description="Kafka topic of observed outcomes (must exist); none: no join"
    )
    outcome_field: str = Field(
        default="label",
        min_length=1,
        max_length=200,
        description="Field of an outcome event holding the observed label or value",
    )
    join_by: Literal["key", "source"] = Field(
        default="key",
        description=(
            "`key`: an outcome carries the deployment's key field; `source`: it carries the "
            "input event's `source_topic`, `source_partition` and `source_offset`"
        ),
    )
    window_s: int = Field(
        default=86400,
        ge=60,
        le=MAX_OUTCOME_WINDOW_S,
        description="Seconds after a prediction its outcome may arrive; later ones count as late",
    )
    metric: Literal["log_loss", "accuracy", "rmse", "mae"] | None = Field(
        default=None,
        description=(
            "Metric of the A/B verdict (default: log_loss for classification, rmse for regression)"
        ),
    )
    champion: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        max_length=100,
        description="Variant the others are compared with (default: the largest live weight)",
    )
    drift_psi_threshold: float = Field(
        default=0.2, gt=0, le=100, description="A feature drifted when its PSI is above this"
    )
    alpha: float = Field(
        default=0.05, gt=0, le=0.5, description="Significance level of the sequential test"
    )


class Policy(BaseModel):
    """What the monitor may do on its own; every action is a new, audited revision."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    auto_promote: bool = Field(
        default=False, description="Give all live traffic to a challenger that significantly wins"
    )
    auto_rollback: bool = Field(
        default=False,
        description="Take a variant out whose dead-letter rate or metric crosses its bound",
    )
    min_outcomes: int = Field(
        default=1000,
        ge=1,
        le=1_000_000_000,
        description="Outcomes each variant needs before an automatic action",
    )
    max_dead_letter_rate: float = Field(
        default=0.05, ge=0, le=1, description="Dead letters per event above which to roll back"
    )


class DeploymentPut(BaseModel):
    """The desired state of a deployment."""

    model_config = ConfigDict(extra="forbid")

    input_topic: TopicName = Field(description="Kafka topic of the events to score")
    output_topic: TopicName = Field(description="Kafka topic the predictions go to")
    key_field: str = Field(
        min_length=1, max_length=200, description="Event field holding the entity key"
    )
    pool: str = Field(
        default="default", pattern=NAME_PATTERN, max_length=100, description="Scorer pool"
    )
    output_format: Literal["json", "avro"] = Field(
        default="json",
        description="`avro`: predictions in Avro, framed with the id of the prediction schema "
        "registered under `<output_topic>-value` in the Schema Registry",
    )
    include_features: bool = Field(
        default=False,
        description="Write each prediction's model input vector (raw columns and the feature "
        "set's `sql.<name>` columns) in its record, as `features`",
    )
    variants: list[VariantIn] = Field(min_length=1, max_length=MAX_VARIANTS)
    description: str = Field(default="", max_length=2000)
    monitoring: MonitoringConfig | None = Field(
        default=None, description="Outcome join, verdict metric and drift threshold (optional)"
    )
    policy: Policy | None = Field(
        default=None, description="Automatic promotion and rollback (optional; off when absent)"
    )
    reason: Reason = ""

    @model_validator(mode="after")
    def _check(self) -> DeploymentPut:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        live = [v for v in self.variants if not v.shadow]
        if not live:
            raise ValueError("at least one variant must be live (shadow: false)")
        total = sum(v.weight for v in live)
        if total != 100:
            raise ValueError(f"the weights of live variants must sum to 100, got {total}")
        if self.input_topic == self.output_topic:
            raise ValueError("input_topic and output_topic must differ")
        outcomes = self.monitoring.outcomes_topic if self.monitoring else None
        if outcomes is not None and outcomes == self.output_topic:
            raise ValueError("monitoring.outcomes_topic must differ from output_topic")
        champion = self.monitoring.champion if self.monitoring else None
        if champion is not None and champion not in {v.name for v in live}:
            raise ValueError(
                f"monitoring.champion '{champion}' is not a live variant of this deployment "
                f"(live: {', '.join(sorted(v.name for v in live))})"
            )
        return self


class VariantOut(BaseModel):
    name: str
    model: str
    version: int
    weight: int
    shadow: bool
    shadow_sample_pct: float | None


class DeploymentSpecOut(BaseModel):
    """A stored, normalized desired state (aliases already resolved to versions)."""

    input_topic: str
    output_topic: str
    key_field: str
    pool: str
    output_format: Literal["json", "avro"] = "json"
    include_features: bool = False
    description: str
    variants: list[VariantOut]
    # Left out when absent, so a spec without them reads as it did before they existed.
    monitoring: MonitoringConfig | None = Field(default=None, exclude_if=lambda v: v is None)
    policy: Policy | None = Field(default=None, exclude_if=lambda v: v is None)


class DeploymentOut(BaseModel):
    name: str
    status: Literal["running", "stopped"]
    revision: int = Field(description="The current revision number")
    spec: DeploymentSpecOut | None = Field(description="Current desired state; null when stopped")
    salt: str = Field(description="Traffic-splitting salt scorers hash with the entity key")
    created_at: datetime
    updated_at: datetime = Field(description="When the current revision was made")
    stopped_at: datetime | None


class DeploymentApplied(DeploymentOut):
    changed: bool = Field(
        description="True when this call stored a new revision (201); false if unchanged (200)"
    )


class RevisionOut(BaseModel):
    number: int
    stopped: bool
    spec: DeploymentSpecOut | None
    spec_hash: str
    reason: str
    created_by: str
    created_at: datetime


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: int = Field(ge=1, le=MAX_VERSION, description="Revision whose spec to restore")
    reason: Reason = ""


class RolloutScorerOut(BaseModel):
    """What one scorer instance of the pool reports for this deployment."""

    instance_id: str
    pool: str
    host: str
    served_revision: int | None = Field(description="Revision whose models it serves")
    state: str = Field(
        description="loading, serving, stalled (events waiting, no batch completed within the "
        "stall timeout: its last_error says why), failed or stopped"
    )
    loaded_versions: list[str] = Field(description="Model versions in its cache, `model/version`")
    last_error: str | None
    events_scored: int
    dead_letters: int
    seen_at: datetime = Field(description="When the control plane last heard from it")
    live: bool = Field(description="Heard from within 3 status intervals and not shutting down")


class RolloutOut(BaseModel):
    """How far the current revision has reached the scorers, from their status records."""

    desired_revision: int = Field(description="The deployment's current revision")
    scorers: list[RolloutScorerOut]
    up_to_date: int = Field(description="Live scorers serving the desired revision")
    total: int = Field(description="Live scorers of the pool that report this deployment")
    stalled: int = Field(
        default=0, description="Live scorers whose scoring loop for this deployment is stalled"
    )
    summary: str = Field(
        examples=["3/3 scorers on revision 7", "3/3 scorers on revision 7, 1 stalled"]
    )


class DeploymentDetail(DeploymentOut):
    rollout: RolloutOut


class ScorerDeploymentOut(BaseModel):
    name: str
    served_revision: int | None
    desired_revision: int = Field(description="The latest revision the scorer has seen")
    state: str
    loaded_versions: list[str]
    last_error: str | None
    events_scored: int
    dead_letters: int


class ScorerOut(BaseModel):
    """A scorer instance, as its latest status record describes it."""

    instance_id: str
    pool: str
    host: str
    started_at: datetime
    updated_at: datetime = Field(description="When the scorer wrote its latest status (its clock)")
    seen_at: datetime = Field(description="When the control plane received it")
    interval_s: float = Field(description="How often the scorer publishes its status")
    stopping: bool
    live: bool = Field(description="Heard from within 3 status intervals and not shutting down")
    deployments: list[ScorerDeploymentOut]
