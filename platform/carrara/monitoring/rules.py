"""The monitoring rules, each in one place, as pure functions (no database, no Kafka).

- the monitoring config of a stored spec, with the defaults of `MonitoringConfig`;
- the verdict's evidence: a sequential test of challenger against champion that says nothing
  (no winner, not significant) until each arm has the minimum number of outcomes;
- drift of one feature: PSI (and KS for numeric features) of live bin counts against the training
  profile, and whether it is above the threshold.

The champion rule (the configured champion if it is a live variant, else the live variant with
the largest weight) is `carrara.deployments.service.champion_of`: deployments validate specs
with it, and monitoring imports deployments, never the other way round.

The API (carrara.monitoring.verdict, .drift), the alert checks (.alerts) and the automatic
policies (.policies) all decide through these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from carrara.deployments.schemas import MonitoringConfig, Policy
from carrara.monitoring import statistics

# Below this many outcomes per arm the plug-in variance of the sequential test is too noisy to
# report an interval worth reading, so the verdict says so instead (and no policy acts).
MIN_VERDICT_OUTCOMES = 30
NOT_ENOUGH = "not enough outcomes yet"


def finite(value: float | None) -> float | None:
    """`value`, or None when it is undefined (JSON has no NaN or infinity)."""
    return value if value is not None and math.isfinite(value) else None


# --- config ---------------------------------------------------------------------------------


def monitoring_config(raw: dict[str, Any] | None) -> MonitoringConfig:
    """A spec's stored `monitoring` object as a `MonitoringConfig` (its defaults if absent).

    Stored specs were validated when written; one that no longer validates (written by an older
    schema) keeps its values and takes the defaults for what it lacks.
    """
    try:
        return MonitoringConfig.model_validate(raw or {})
    except ValidationError:
        return MonitoringConfig.model_construct(**(raw or {}))


def config_of(spec: dict[str, Any]) -> MonitoringConfig:
    """The monitoring config of a stored spec, with `MonitoringConfig`'s defaults."""
    return monitoring_config(spec.get("monitoring"))


# --- verdict evidence -----------------------------------------------------------------------


def per_row_values(
    metric: str,
    task: str | None,
    scores: np.ndarray,
    outcomes: np.ndarray,
    correct: np.ndarray,
) -> np.ndarray:
    """The per-row metric of joined outcomes, whose mean is the metric (rmse: squared error).

    A multiclass join stores P(observed class) as the score and the class index as the outcome,
    so there log loss is -log(score) and accuracy is the joined `correct` flag (as 0.0 / 1.0).
    """
    if task == "multiclass" and metric == "log_loss":
        return statistics.per_row_metric(metric, scores, np.ones_like(scores))
    if task == "multiclass" and metric == "accuracy":
        return np.asarray(correct, dtype=np.float64)
    return statistics.per_row_metric(metric, scores, outcomes)


@dataclass(frozen=True, slots=True)
class Evidence:
    """One challenger against the champion; conclusive only with enough outcomes in each arm."""

    champion: str
    challenger: str
    result: statistics.SequentialResult
    min_outcomes: int

    @property
    def enough(self) -> bool:
        """Whether each arm has at least `min_outcomes` outcomes."""
        return min(self.result.n_champion, self.result.n_challenger) >= self.min_outcomes

    @property
    def significant(self) -> bool:
        return self.enough and self.result.significant

    @property
    def better(self) -> statistics.Better | None:
        """The significantly better arm; None without enough outcomes or significance."""
        return self.result.better if self.significant else None

    @property
    def text(self) -> str:
        """The verdict in words (or why there is none yet)."""
        if self.enough:
            return statistics.verdict_text(self.result, self.champion, self.challenger)
        return (
            f"{NOT_ENOUGH} (champion {self.champion}: {self.result.n_champion:,}, challenger "
            f"{self.challenger}: {self.result.n_challenger:,}; {self.min_outcomes} each needed)"
        )

    def details(self) -> dict[str, Any]:
        """The evidence as JSON (for alerts and audit entries)."""
        r = self.result
        return {
            "metric": r.metric,
            "champion": self.champion,
            "challenger": self.challenger,
            "n_champion": r.n_champion,
            "n_challenger": r.n_challenger,
            "min_outcomes": self.min_outcomes,
            "mean_champion": r.mean_champion,
            "mean_challenger": r.mean_challenger,
            "ci": [r.ci_low, r.ci_high],
            "p_value": r.p_value,
        }


def evidence(
    champion: str,
    challenger: str,
    champion_values: np.ndarray,
    challenger_values: np.ndarray,
    *,
    metric: str,
    alpha: float,
    min_outcomes: int = MIN_VERDICT_OUTCOMES,
) -> Evidence:
    """The sequential test of `challenger` against `champion` on per-row metric values.

    `min_outcomes` is raised to MIN_VERDICT_OUTCOMES if lower: below that no interval is reported
    and nothing is decided, whoever asks (the API or a policy with a lower `min_outcomes`).
    """
    result = statistics.sequential_test(
        champion_values, challenger_values, metric=metric, alpha=alpha
    )
    return Evidence(
        champion=champion,
        challenger=challenger,
        result=result,
        min_outcomes=max(min_outcomes, MIN_VERDICT_OUTCOMES),
    )


def policy_action(ev: Evidence, policy: Policy) -> str | None:
    """What `policy` does on `ev`: "auto_rollback", "auto_promote" or nothing (None).

    Nothing before both arms have the policy's `min_outcomes` (and the verdict's own minimum),
    whichever the action: a rollback needs as much evidence as a promotion.
    """
    n = min(ev.result.n_champion, ev.result.n_challenger)
    if n < policy.min_outcomes or ev.better is None:
        return None
    if ev.better == "champion" and policy.auto_rollback:
        return "auto_rollback"
    if ev.better == "challenger" and policy.auto_promote:
        return "auto_promote"
    return None


# --- drift ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureDriftResult:
    kind: str
    psi: float | None  # None: nothing to compare (no live counts, or binned by another profile)
    ks: float | None  # numeric features only
    live_count: int
    drifted: bool


def feature_drift(profile: Any, counts: list[int] | None, threshold: float) -> FeatureDriftResult:
    """PSI (and KS for a numeric feature) of live bin `counts` against a training `profile`.

    Counts binned by another profile (a different number of bins) cannot be compared with this
    one: no PSI then, and no drift.
    """
    kind = str(profile.get("kind", "")) if isinstance(profile, dict) else ""
    shares = profile.get("shares") if isinstance(profile, dict) else None
    live = list(counts or [])
    if isinstance(shares, list) and not live:
        live = [0] * len(shares)
    live_count = sum(live)
    psi = ks = None
    if isinstance(shares, list) and len(shares) == len(live) and live_count > 0:
        psi = finite(statistics.psi(shares, live))
        if kind == "numeric":
            ks = finite(statistics.ks_statistic(shares, live))
    return FeatureDriftResult(
        kind=kind,
        psi=psi,
        ks=ks,
        live_count=live_count,
        drifted=psi is not None and psi > threshold,
    )
