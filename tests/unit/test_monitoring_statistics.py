"""Monitoring statistics: the sequential A/B test survives peeking, drift and quantiles by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

from carrara.monitoring.statistics import (
    auc,
    bin_counts,
    build_profile,
    higher_is_better,
    ks_statistic,
    per_row_metric,
    psi,
    quantile_from_histogram,
    sequential_test,
    verdict_text,
)

EXPERIMENTS = 200
MAX_N = 2_000
PEEK_EVERY = 50


def _predictions(rng: np.random.Generator, size: int | tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """True probabilities, outcomes drawn from them, and a worse model's noisy probabilities."""
    p = rng.beta(2, 5, size=size)
    y = (rng.random(size) < p).astype(np.float64)
    noisy = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + rng.normal(0, 1.0, size=size))))
    return p, y, noisy


def _log_losses(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    p, y, _ = _predictions(rng, size)
    return per_row_metric("log_loss", p, y)


def test_peeking_under_the_null_stays_near_alpha_while_a_repeated_t_test_does_not() -> None:
    rng = np.random.default_rng(7)
    # Both arms: the same model on the same population, so every "winner" is a false positive.
    champion = _log_losses(rng, (EXPERIMENTS, MAX_N))
    challenger = _log_losses(rng, (EXPERIMENTS, MAX_N))
    ever_sequential = np.zeros(EXPERIMENTS, dtype=bool)
    ever_naive = np.zeros(EXPERIMENTS, dtype=bool)
    for n in range(PEEK_EVERY, MAX_N + 1, PEEK_EVERY):
        for i in range(EXPERIMENTS):
            result = sequential_test(champion[i, :n], challenger[i, :n], metric="log_loss")
            ever_sequential[i] |= result.significant
        naive = stats.ttest_ind(champion[:, :n], challenger[:, :n], axis=1, equal_var=False)
        ever_naive |= naive.pvalue <= 0.05
    sequential_rate = ever_sequential.mean()
    naive_rate = ever_naive.mean()
    assert sequential_rate <= 0.08
    # 40 looks at a fixed-sample test: the false-positive rate is several times alpha.
    assert naive_rate >= 0.15
    assert naive_rate > 3 * max(sequential_rate, 0.01)


def test_a_better_model_wins_whichever_arm_it_is_in() -> None:
    rng = np.random.default_rng(11)
    p, y, noisy = _predictions(rng, 4_000)
    good = per_row_metric("log_loss", p, y)
    bad = per_row_metric("log_loss", noisy, y)

    result = sequential_test(bad, good, metric="log_loss")
    assert result.significant
    assert result.better == "challenger"
    assert result.difference is not None
    assert result.difference < 0  # lower log loss
    assert result.ci_high is not None
    assert result.ci_high < 0
    assert result.p_value <= 0.05
    assert result.confidence == pytest.approx(1 - result.p_value)
    assert result.n_champion == result.n_challenger == 4_000
    assert result.mean_champion == pytest.approx(log_loss(y, noisy))

    swapped = sequential_test(good, bad, metric="log_loss")
    assert swapped.significant
    assert swapped.better == "champion"

    # Higher-is-better metrics flip the sign: more accuracy wins.
    good_acc = per_row_metric("accuracy", p, y)
    bad_acc = per_row_metric("accuracy", 1 - p, y)
    accuracy = sequential_test(bad_acc, good_acc, metric="accuracy")
    assert accuracy.difference is not None
    assert accuracy.difference > 0
    assert accuracy.better == "challenger"


def test_no_verdict_from_a_few_events() -> None:
    rng = np.random.default_rng(3)
    p, y, noisy = _predictions(rng, 30)
    result = sequential_test(
        per_row_metric("log_loss", noisy, y), per_row_metric("log_loss", p, y), metric="log_loss"
    )
    assert not result.significant
    assert result.better is None


@pytest.mark.parametrize(
    ("champion", "challenger"),
    [
        ([], []),
        ([0.3], [0.9, 0.1]),
        ([0.3, 0.4], [0.2]),
        ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),  # no variance at all
        ([0.5, math.nan], [0.5, math.inf, 0.2]),  # non-finite values are ignored
    ],
)
def test_tiny_or_constant_samples_are_not_significant(
    champion: list[float], challenger: list[float]
) -> None:
    result = sequential_test(np.array(champion), np.array(challenger), metric="accuracy")
    assert result.p_value == 1.0
    assert not result.significant
    assert result.better is None
    assert result.confidence == 0.0
    assert result.ci_low is None
    assert result.ci_high is None


def test_an_empty_arm_has_no_mean() -> None:
    result = sequential_test(np.array([]), np.array([1.0, 0.0]), metric="accuracy")
    assert result.mean_champion is None
    assert result.mean_challenger == 0.5
    assert result.difference is None
    assert result.n == 2


def test_bad_arguments_are_refused() -> None:
    x = np.array([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="unknown metric"):
        sequential_test(x, x, metric="f1")
    with pytest.raises(ValueError, match="alpha"):
        sequential_test(x, x, metric="mae", alpha=1.5)
    with pytest.raises(ValueError, match="tau"):
        sequential_test(x, x, metric="mae", tau=0.0)


def test_the_p_value_and_the_confidence_sequence_agree() -> None:
    rng = np.random.default_rng(5)
    for shift in np.linspace(0, 0.3, 31):
        a = rng.normal(0, 1, 500)
        b = rng.normal(shift, 1, 400)
        result = sequential_test(a, b, metric="rmse", alpha=0.1, tau=0.2)
        assert result.ci_low is not None
        assert result.ci_high is not None
        excludes_zero = result.ci_low > 0 or result.ci_high < 0
        assert excludes_zero == result.significant == (result.p_value <= 0.1)


def test_the_p_value_follows_the_documented_formula() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([3.0, 4.0, 5.0, 7.0])
    v = np.var(a, ddof=1) / 4 + np.var(b, ddof=1) / 4
    tau2 = 0.25
    d = b.mean() - a.mean()
    likelihood_ratio = math.sqrt(v / (v + tau2)) * math.exp(tau2 * d**2 / (2 * v * (v + tau2)))
    result = sequential_test(a, b, metric="mae", tau=0.5)
    assert result.difference == pytest.approx(d)
    assert result.p_value == pytest.approx(min(1.0, 1 / likelihood_ratio))
    half_width = math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(20) + math.log((v + tau2) / v)))
    assert result.ci_low == pytest.approx(d - half_width)
    assert result.ci_high == pytest.approx(d + half_width)


def test_the_confidence_sequence_covers_the_true_difference_at_every_look() -> None:
    rng = np.random.default_rng(13)
    true_difference = -0.05
    champion = rng.exponential(0.5, size=(EXPERIMENTS, MAX_N))  # skewed, like a loss
    challenger = rng.exponential(0.5, size=(EXPERIMENTS, MAX_N)) + true_difference
    covered_always = np.ones(EXPERIMENTS, dtype=bool)
    for n in range(100, MAX_N + 1, 100):
        for i in range(EXPERIMENTS):
            result = sequential_test(champion[i, :n], challenger[i, :n], metric="mae")
            assert result.ci_low is not None
            assert result.ci_high is not None
            covered_always[i] &= result.ci_low < true_difference < result.ci_high
    assert covered_always.mean() >= 0.93


def test_per_row_metrics_average_to_sklearn() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 500)
    y = (rng.random(500) < p).astype(np.float64)
    assert per_row_metric("log_loss", p, y).mean() == pytest.approx(log_loss(y, p), rel=1e-12)
    assert per_row_metric("accuracy", p, y).mean() == pytest.approx(
        accuracy_score(y, (p >= 0.5).astype(int))
    )
    prediction = rng.normal(3, 2, 500)
    value = prediction + rng.normal(0, 1, 500)
    assert per_row_metric("rmse", prediction, value).mean() == pytest.approx(
        mean_squared_error(value, prediction)
    )
    assert per_row_metric("mae", prediction, value).mean() == pytest.approx(
        mean_absolute_error(value, prediction)
    )
    assert auc(p, y) == pytest.approx(roc_auc_score(y, p))


def test_per_row_metric_edges() -> None:
    # A certain mistake costs a large, finite loss; 0.5 counts as a positive prediction.
    assert per_row_metric("log_loss", np.array([0.0]), np.array([1.0]))[0] == pytest.approx(
        -math.log(1e-15)
    )
    assert per_row_metric("accuracy", np.array([0.5, 0.49]), np.array([1, 1])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="same shape"):
        per_row_metric("mae", np.array([1.0, 2.0]), np.array([1.0]))
    assert higher_is_better("accuracy")
    assert not any(higher_is_better(m) for m in ("log_loss", "rmse", "mae"))


def test_auc_needs_both_classes() -> None:
    assert auc(np.array([0.2, 0.9]), np.array([1, 1])) is None
    assert auc(np.array([]), np.array([])) is None
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_psi_and_ks_by_hand() -> None:
    # Actual shares 0.75 / 0.25 against 0.5 / 0.5.
    expected = 0.25 * math.log(1.5) + (-0.25) * math.log(0.5)
    assert psi([0.5, 0.5], [30, 10]) == pytest.approx(expected)
    assert ks_statistic([0.5, 0.5], [30, 10]) == pytest.approx(0.25)
    assert ks_statistic([0.2, 0.3, 0.5], [1, 1, 0]) == pytest.approx(0.5)
    # An empty bin counts as a share of 1e-4: finite, and large.
    empty = 0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    assert psi([0.5, 0.5], [10, 0]) == pytest.approx(empty)
    assert psi([0.5, 0.5], [0, 0]) == 0.0
    assert ks_statistic([0.5, 0.5], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="do not match"):
        psi([0.5, 0.5], [1, 2, 3])


def test_psi_of_the_same_distribution_is_near_zero_and_of_a_shifted_one_large() -> None:
    rng = np.random.default_rng(2)
    profile = build_profile(rng.normal(0, 1, 20_000), "numeric")
    same = bin_counts(profile, rng.normal(0, 1, 20_000))
    shifted = bin_counts(profile, rng.normal(1, 1, 20_000))
    assert psi(profile["shares"], same) < 0.01
    assert ks_statistic(profile["shares"], same) < 0.02
    assert psi(profile["shares"], shifted) > 0.2
    assert ks_statistic(profile["shares"], shifted) > 0.3


def test_numeric_profile_round_trip() -> None:
    rng = np.random.default_rng(4)
    values = rng.lognormal(0, 1, 10_000)
    values[:500] = np.nan
    profile = build_profile(values, "numeric", bins=10)
    assert profile["kind"] == "numeric"
    assert len(profile["edges"]) == 9
    assert profile["edges"] == sorted(profile["edges"])
    assert len(profile["shares"]) == 10
    assert profile["missing_share"] == pytest.approx(0.05)
    # Quantile edges: each bin holds a tenth of the training values.
    assert profile["shares"] == pytest.approx([0.1] * 10, abs=2e-3)
    counts = bin_counts(profile, values)
    assert sum(counts) == 9_500  # NaN not counted
    assert counts == [round(s * 9_500) for s in profile["shares"]]
    # Edges belong to the bin they open; None, NaN and non-numbers are not counted.
    small = {"kind": "numeric", "edges": [1.0, 2.0], "shares": [0.3, 0.3, 0.4]}
    assert bin_counts(small, [0.5, 1.0, 1.5, 2.0, 9.0, None, math.nan, "x"]) == [1, 2, 2]
    assert bin_counts(small, np.array([-math.inf, math.inf])) == [1, 0, 1]


def test_numeric_profile_with_ties_and_nothing_present() -> None:
    profile = build_profile(np.array([0.0] * 90 + [1.0] * 10), "numeric", bins=10)
    assert profile["edges"] == [0.0, 1.0]
    assert profile["shares"] == [0.0, 0.9, 0.1]
    empty = build_profile(np.array([math.nan, math.nan]), "numeric")
    assert empty["edges"] == []
    assert empty["shares"] == [0.0]
    assert empty["missing_share"] == 1.0


def test_category_profile_round_trip() -> None:
    values = ["fr"] * 50 + ["de"] * 30 + ["it"] * 15 + ["es"] * 5 + [None] * 20
    profile = build_profile(values, "category", bins=3)
    assert profile["kind"] == "category"
    assert profile["categories"] == ["fr", "de", "it"]
    assert profile["shares"] == pytest.approx([0.5, 0.3, 0.15, 0.05])
    assert profile["missing_share"] == pytest.approx(20 / 120)
    # Unknown values go to "other"; None and NaN are not counted.
    assert bin_counts(profile, ["de", "pt", "fr", "es", None, math.nan, "de"]) == [1, 2, 0, 2]
    # Numbers meet their training categories whatever their JSON or numpy type.
    numbers = build_profile(np.array([1, 1, 2]), "category")
    assert numbers["categories"] == ["1", "2"]
    assert bin_counts(numbers, [1, 1.0, "1", 2, 3]) == [3, 1, 1]


def test_unknown_profile_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_profile([1, 2], "text")  # type: ignore[arg-type]


def test_quantile_from_a_known_histogram() -> None:
    edges = [1, 2, 5, 10]
    counts = [10, 30, 40, 20, 0]  # cumulative 10, 40, 80, 100
    assert quantile_from_histogram(counts, edges, 0.5) == pytest.approx(2 + 3 * 10 / 40)
    assert quantile_from_histogram(counts, edges, 0.99) == pytest.approx(5 + 5 * 19 / 20)
    assert quantile_from_histogram(counts, edges, 0.05) == pytest.approx(0.5)  # first bin from 0
    assert quantile_from_histogram(counts, edges, 1.0) == pytest.approx(10)
    # The overflow bin reports the last edge.
    assert quantile_from_histogram([0, 0, 1, 0, 99], edges, 0.99) == 10
    assert quantile_from_histogram([0, 0, 0, 0, 0], edges, 0.5) is None
    # Empty leading bins are skipped even at q = 0.
    assert quantile_from_histogram([0, 0, 4, 0, 0], edges, 0.0) == 2
    with pytest.raises(ValueError, match="counts"):
        quantile_from_histogram([1, 2], edges, 0.5)
    with pytest.raises(ValueError, match="q must be"):
        quantile_from_histogram(counts, edges, 1.5)


def test_verdict_text() -> None:
    rng = np.random.default_rng(11)
    p, y, noisy = _predictions(rng, 20_600)
    winner = sequential_test(
        per_row_metric("log_loss", noisy, y), per_row_metric("log_loss", p, y), metric="log_loss"
    )
    text = verdict_text(winner, "a", "b")
    assert text.startswith("challenger better, ")
    assert text.endswith(" confidence, n = 41,200 (challenger b vs. champion a)")

    close = sequential_test(
        np.array([0.2, 0.4, 0.3, 0.5]), np.array([0.3, 0.5, 0.2, 0.4]), metric="mae"
    )
    assert verdict_text(close, "a", "b") == (
        "no significant difference yet (p = 1, n = 8; challenger b vs. champion a)"
    )


@pytest.mark.parametrize(
    ("p_value", "percent"),
    [(0.03, "97%"), (0.0449, "95%"), (0.004, "99.6%"), (1e-300, "99.9%"), (0.0, "99.9%")],
)
def test_verdict_confidence_is_rounded_down(p_value: float, percent: str) -> None:
    rng = np.random.default_rng(0)
    result = sequential_test(rng.normal(0, 1, 2_000), rng.normal(1, 1, 1_200), metric="mae")
    forced = dataclasses.replace(
        result, p_value=p_value, confidence=1 - p_value, significant=True, better="champion"
    )
    assert verdict_text(forced, "blue", "green") == (
        f"champion better, {percent} confidence, n = 3,200 (challenger green vs. champion blue)"
    )
