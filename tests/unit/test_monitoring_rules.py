"""Monitoring rules, each in one place: champion, verdict evidence, drift, config defaults, join.

Pure logic, no services. Each test would fail if the wrong behaviour of a former copy came back:
a configured champion that is not live chosen anyway, a policy acting on too few outcomes, drift
computed on counts binned by another profile, defaults re-typed instead of read from
`MonitoringConfig`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from carrara.deployments.schemas import MonitoringConfig, Policy
from carrara.deployments.service import champion_of
from carrara.monitoring import rules
from carrara.monitoring.join import judge, norm_label
from carrara.monitoring.topology import roles_of
from carrara.monitoring.watched import watched_from_spec


def _spec(
    variants: list[dict[str, Any]], monitoring: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input_topic": "in",
        "output_topic": "out",
        "key_field": "id",
        "pool": "default",
        "variants": [
            {"model": "m", "version": 1, "shadow": False, "weight": 0, **v} for v in variants
        ],
    }
    if monitoring is not None:
        spec["monitoring"] = monitoring
    return spec


# --- champion -------------------------------------------------------------------------------


def test_the_configured_champion_wins_when_it_is_live() -> None:
    spec = _spec([{"name": "a", "weight": 90}, {"name": "b", "weight": 10}], {"champion": "b"})
    assert champion_of(spec) == "b"
    assert watched_from_spec("d", 0, spec).champion == "b"


def test_a_non_live_variant_is_never_the_champion() -> None:
    # A configured champion that is a shadow variant (or no variant at all) is ignored: the live
    # variant with the largest weight is the champion, for the monitor as for the API.
    spec = _spec(
        [
            {"name": "a", "weight": 30},
            {"name": "b", "weight": 70},
            {"name": "s", "shadow": True, "weight": 0, "shadow_sample_pct": 10},
        ],
        {"champion": "s"},
    )
    assert champion_of(spec) == "b"
    assert watched_from_spec("d", 0, spec).champion == "b"
    spec["monitoring"] = {"champion": "gone"}
    assert watched_from_spec("d", 0, spec).champion == "b"


def test_without_a_configured_champion_the_largest_live_weight_wins_ties_by_order() -> None:
    spec = _spec(
        [
            {"name": "a", "weight": 50},
            {"name": "b", "weight": 50},
            {"name": "z", "shadow": True, "weight": 0, "shadow_sample_pct": 100},
        ]
    )
    assert champion_of(spec) == "a"
    assert watched_from_spec("d", 0, spec).champion == "a"


# --- config defaults ------------------------------------------------------------------------


def test_defaults_come_from_monitoring_config() -> None:
    defaults = MonitoringConfig()
    assert rules.monitoring_config(None) == defaults
    assert rules.config_of(_spec([{"name": "a", "weight": 100}])) == defaults
    partial = rules.monitoring_config({"outcomes_topic": "outcomes", "window_s": 120})
    assert partial.window_s == 120
    assert partial.alpha == defaults.alpha
    assert partial.drift_psi_threshold == defaults.drift_psi_threshold
    assert partial.outcome_field == defaults.outcome_field
    w = watched_from_spec("d", 0, _spec([{"name": "a", "weight": 100}]))
    assert w.window.total_seconds() == defaults.window_s
    assert w.outcomes_topic is None
    assert w.config == defaults


def test_a_stored_config_the_schema_no_longer_accepts_keeps_its_values() -> None:
    config = rules.monitoring_config({"window_s": 3600, "retired_option": True})
    assert config.window_s == 3600
    assert config.alpha == MonitoringConfig().alpha


# --- verdict evidence -----------------------------------------------------------------------


def _losses(n: int, mean: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, 0.05, n)


def test_evidence_below_the_minimum_outcome_count_gives_no_verdict() -> None:
    n = rules.MIN_VERDICT_OUTCOMES - 1
    champion, challenger = _losses(n, 0.2, 1), _losses(n, 0.9, 2)
    # The test alone is already sure (a huge difference)...
    ev = rules.evidence("a", "b", champion, challenger, metric="log_loss", alpha=0.05)
    assert ev.result.significant
    # ...but below the minimum per arm nothing is decided, and the text says why.
    assert not ev.enough
    assert ev.better is None
    assert not ev.significant
    assert ev.text.startswith(rules.NOT_ENOUGH)
    assert rules.policy_action(ev, Policy(auto_rollback=True, auto_promote=True)) is None


def test_a_policy_never_acts_below_its_min_outcomes_rollback_included() -> None:
    rollback = Policy(auto_rollback=True, min_outcomes=1000)
    promote = Policy(auto_promote=True, min_outcomes=1000)
    worse = rules.evidence(
        "a", "b", _losses(500, 0.2, 1), _losses(500, 0.9, 2), metric="log_loss", alpha=0.05
    )
    assert worse.better == "champion"  # a verdict the API shows (30 outcomes each suffice)...
    assert rules.policy_action(worse, rollback) is None  # ...but the old rollback acted on it
    judged_by_policy = rules.evidence(
        "a",
        "b",
        _losses(500, 0.2, 1),
        _losses(500, 0.9, 2),
        metric="log_loss",
        alpha=0.05,
        min_outcomes=rollback.min_outcomes,
    )
    assert judged_by_policy.better is None
    assert judged_by_policy.text.startswith(rules.NOT_ENOUGH)
    # The minimum holds for each arm: a big challenger arm does not make up for a small champion.
    better = rules.evidence(
        "a", "b", _losses(500, 0.9, 3), _losses(5000, 0.2, 4), metric="log_loss", alpha=0.05
    )
    assert better.result.better == "challenger"
    assert rules.policy_action(better, promote) is None


def test_with_enough_outcomes_the_policy_acts_on_the_better_arm() -> None:
    champion_worse = rules.evidence(
        "a", "b", _losses(1000, 0.9, 5), _losses(1000, 0.2, 6), metric="log_loss", alpha=0.05
    )
    champion_better = rules.evidence(
        "a", "b", _losses(1000, 0.2, 7), _losses(1000, 0.9, 8), metric="log_loss", alpha=0.05
    )
    policy = Policy(auto_rollback=True, auto_promote=True, min_outcomes=1000)
    assert rules.policy_action(champion_worse, policy) == "auto_promote"
    assert rules.policy_action(champion_better, policy) == "auto_rollback"
    assert rules.policy_action(champion_better, Policy(auto_promote=True)) is None
    details = champion_better.details()
    assert details["challenger"] == "b"
    assert details["mean_challenger"] > details["mean_champion"]
    assert details["min_outcomes"] == rules.MIN_VERDICT_OUTCOMES


def test_a_lower_min_outcomes_never_goes_below_the_verdicts_minimum() -> None:
    ev = rules.evidence(
        "a",
        "b",
        _losses(10, 0.2, 1),
        _losses(10, 0.9, 2),
        metric="log_loss",
        alpha=0.05,
        min_outcomes=1,
    )
    assert ev.min_outcomes == rules.MIN_VERDICT_OUTCOMES
    assert ev.better is None


def test_multiclass_accuracy_rows_are_numbers_however_correct_is_given() -> None:
    scores = np.array([0.9, 0.4, 0.7])
    outcomes = np.array([0.0, 2.0, 1.0])
    for correct in (np.array([True, False, True]), np.array([1.0, 0.0, 1.0])):
        values = rules.per_row_values("accuracy", "multiclass", scores, outcomes, correct)
        assert values.dtype == np.float64
        assert values.tolist() == [1.0, 0.0, 1.0]
    losses = rules.per_row_values("log_loss", "multiclass", scores, outcomes, correct)
    assert losses == pytest.approx(-np.log(scores))


# --- drift ----------------------------------------------------------------------------------

PROFILE = {"kind": "numeric", "shares": [0.25, 0.25, 0.25, 0.25]}


def test_drift_of_a_shifted_feature_is_above_the_threshold_with_ks() -> None:
    result = rules.feature_drift(PROFILE, [0, 0, 100, 900], 0.2)
    assert result.psi is not None
    assert result.psi > 0.2
    assert result.ks is not None
    assert result.ks > 0.5
    assert result.drifted
    assert result.live_count == 1000


def test_no_drift_for_counts_like_the_profile_and_no_ks_for_categories() -> None:
    same = rules.feature_drift(PROFILE, [250, 250, 250, 250], 0.2)
    assert same.psi == pytest.approx(0.0, abs=1e-9)
    assert not same.drifted
    category = rules.feature_drift({"kind": "category", "shares": [0.5, 0.5]}, [10, 990], 0.2)
    assert category.drifted
    assert category.ks is None


def test_counts_binned_by_another_profile_or_none_at_all_are_not_drift() -> None:
    other_bins = rules.feature_drift(PROFILE, [0, 0, 1000], 0.2)
    assert other_bins.psi is None
    assert not other_bins.drifted
    nothing = rules.feature_drift(PROFILE, None, 0.2)
    assert nothing.live_count == 0
    assert nothing.psi is None
    assert not nothing.drifted


def test_the_threshold_is_the_configured_one() -> None:
    result = rules.feature_drift(PROFILE, [150, 250, 250, 350], 0.2)
    assert result.psi is not None
    assert 0.01 < result.psi < 0.2
    assert not result.drifted
    assert rules.feature_drift(PROFILE, [150, 250, 250, 350], 0.01).drifted


# --- topology and join ----------------------------------------------------------------------


def test_roles_of_the_topics_a_deployment_needs_read() -> None:
    plain = watched_from_spec("plain", 2_000, _spec([{"name": "a", "weight": 100}]))
    joined = watched_from_spec(
        "joined",
        1_000,
        _spec([{"name": "a", "weight": 100}], {"outcomes_topic": "outcomes"}),
    )
    joined.profiles = {"amount": PROFILE}
    roles = roles_of({"plain": plain, "joined": joined})
    assert set(roles) == {"out", "in.dead-letters", "in", "outcomes"}
    assert roles["out"].predictions
    assert roles["in.dead-letters"].dead_letters == {"plain", "joined"}
    assert roles["in"].inputs == {"joined"}  # only a deployment with a profile reads inputs
    assert roles["outcomes"].outcomes == {"joined"}
    assert roles["out"].since_ms == 1_000  # the oldest deployment on the topic


def test_judging_binary_multiclass_and_regression_outcomes() -> None:
    binary = judge("binary", [0, 1], 0.8, 1, True)
    assert binary is not None
    assert (binary.outcome, binary.correct) == (1.0, True)
    assert binary.log_loss == pytest.approx(-np.log(0.8))
    multiclass = judge("multiclass", ["x", "y", "z"], [0.1, 0.7, 0.2], "y", "z")
    assert multiclass is not None
    assert (multiclass.score, multiclass.outcome, multiclass.correct) == (0.2, 2.0, False)
    assert judge("multiclass", ["x", "y"], [0.5, 0.5], "x", "unknown") is None
    regression = judge("regression", None, 3.0, None, 2.5)
    assert regression is not None
    assert regression.error == pytest.approx(0.5)
    assert regression.correct is None
    assert judge("regression", None, 3.0, None, "n/a") is None
    assert norm_label(1.0) == norm_label(True) == norm_label("1") == "1"
