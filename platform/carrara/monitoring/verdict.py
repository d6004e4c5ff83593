"""The A/B verdict: each challenger against the champion, by the sequential test on joined outcomes.

The evidence is gathered once, here (`revision_evidence`), for the API's verdict and for the
automatic policies alike: the outcomes of predictions made since a revision was created, by the
model versions it serves, judged by `rules.evidence` (nothing is decided below the minimum number
of outcomes per arm).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.models import DeploymentRevision, JoinedOutcome
from carrara.monitoring import statistics
from carrara.monitoring.queries import last_running_revision
from carrara.monitoring.rules import (
    MIN_VERDICT_OUTCOMES,
    Evidence,
    config_of,
    evidence,
    finite,
    per_row_values,
)


def joined_values(
    session: Session,
    name: str,
    variant: str,
    version: int,
    since: datetime,
    *,
    metric: str,
    task: str | None,
) -> np.ndarray:
    """The per-row `metric` of `variant`'s joined outcomes of predictions made since `since`."""
    # Three arrays of one aggregate pass (same rows, same order): thousands of rows arrive as
    # three lists instead of thousands of result rows.
    score_list, outcome_list, correct_list = session.execute(
        select(
            func.array_agg(JoinedOutcome.score),
            func.array_agg(JoinedOutcome.outcome),
            func.array_agg(JoinedOutcome.correct),
        ).where(
            JoinedOutcome.deployment == name,
            JoinedOutcome.variant == variant,
            JoinedOutcome.model_version == version,
            JoinedOutcome.predicted_at >= since,
        )
    ).one()
    scores = np.asarray(score_list or [], dtype=np.float64)
    outcomes = np.asarray(outcome_list or [], dtype=np.float64)
    correct = np.asarray([1.0 if c else 0.0 for c in correct_list or []], dtype=np.float64)
    return per_row_values(metric, task, scores, outcomes, correct)


@dataclass(frozen=True, slots=True)
class RevisionEvidence:
    """The evidence of a revision: its verdict metric, champion, and each challenger's test."""

    metric: str
    alpha: float
    champion: str
    comparisons: dict[str, Evidence]  # by challenger, in name order


def revision_evidence(
    session: Session,
    name: str,
    spec: dict[str, Any],
    since: datetime,
    *,
    min_outcomes: int = MIN_VERDICT_OUTCOMES,
    challengers: Iterable[str] | None = None,
) -> RevisionEvidence:
    """Test `challengers` (default: every variant but the champion) against the champion.

    Only outcomes of predictions made since `since` (the revision's creation) by the model
    versions `spec` serves count; the metric and alpha are the spec's (with their defaults).
    """
    metric = deployments.verdict_metric(session, spec)
    task = deployments.champion_task(session, spec)
    champion = deployments.champion_of(spec)
    alpha = config_of(spec).alpha
    versions = {v["name"]: int(v["version"]) for v in spec["variants"]}
    names = versions if challengers is None else set(challengers)
    champion_values = joined_values(
        session, name, champion, versions[champion], since, metric=metric, task=task
    )
    comparisons: dict[str, Evidence] = {}
    for challenger in sorted(n for n in names if n != champion and n in versions):
        values = joined_values(
            session, name, challenger, versions[challenger], since, metric=metric, task=task
        )
        comparisons[challenger] = evidence(
            champion,
            challenger,
            champion_values,
            values,
            metric=metric,
            alpha=alpha,
            min_outcomes=min_outcomes,
        )
    return RevisionEvidence(metric=metric, alpha=alpha, champion=champion, comparisons=comparisons)


@dataclass
class Comparison:
    challenger: str
    n_champion: int
    n_challenger: int
    mean_champion: float | None
    mean_challenger: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    confidence: float | None
    better: str | None
    significant: bool
    verdict: str


@dataclass
class Verdict:
    deployment: str
    since: datetime
    metric: str
    higher_is_better: bool
    alpha: float
    champion: str
    min_outcomes: int
    comparisons: list[Comparison]


def comparison(ev: Evidence) -> Comparison:
    """What the API shows of one challenger's evidence (no interval without enough outcomes)."""
    r = ev.result
    enough = ev.enough
    return Comparison(
        challenger=ev.challenger,
        n_champion=r.n_champion,
        n_challenger=r.n_challenger,
        mean_champion=finite(r.mean_champion),
        mean_challenger=finite(r.mean_challenger),
        difference=finite(r.difference),
        ci_low=finite(r.ci_low) if enough else None,
        ci_high=finite(r.ci_high) if enough else None,
        p_value=finite(r.p_value) if enough else None,
        confidence=finite(r.confidence) if enough else None,
        better=ev.better,
        significant=ev.significant,
        verdict=ev.text,
    )


def verdict(session: Session, name: str) -> Verdict:
    """Every other variant (live or shadow) against the champion, by the sequential test.

    Counts the outcomes of predictions made since the current revision, by the model versions it
    serves: the evidence the automatic promotion/rollback policy acts on, and never traffic that
    another configuration produced. Arms with fewer than MIN_VERDICT_OUTCOMES outcomes are
    reported as "not enough outcomes yet".
    """
    deployment, _ = deployments.get_deployment(session, name)
    return verdict_of(session, name, last_running_revision(session, deployment))


def verdict_of(session: Session, name: str, revision: DeploymentRevision) -> Verdict:
    """`verdict` of deployment `name` whose last running revision is `revision`."""
    spec = dict(revision.spec or {})
    found = revision_evidence(session, name, spec, revision.created_at)
    return Verdict(
        deployment=name,
        since=revision.created_at,
        metric=found.metric,
        higher_is_better=statistics.higher_is_better(found.metric),
        alpha=found.alpha,
        champion=found.champion,
        min_outcomes=MIN_VERDICT_OUTCOMES,
        comparisons=[comparison(ev) for ev in found.comparisons.values()],
    )
