"""Statistics of live monitoring: per-row metrics, the A/B sequential test, drift, quantiles.

Pure functions of numpy arrays and plain lists (numpy, scipy and scikit-learn only), so the monitor
process, the API and the tests compute the same numbers.

## The A/B test: a mixture sequential probability ratio test (mSPRT)

A verdict is recomputed every time someone looks at it, so a fixed-sample test (a t-test) would be
"peeked at" thousands of times and sooner or later declare a winner by chance. Following Johari et
al. (2017, "Peeking at A/B tests") and Howard et al. (2021, "Time-uniform, nonparametric,
nonasymptotic confidence sequences"), we test the difference of mean per-row metric
`theta = mean(challenger) - mean(champion)` with a normal mixture over the alternative
(`theta ~ N(0, tau^2)`). With `d` the observed difference and `V = s_a^2/n_a + s_b^2/n_b` its
estimated variance, the mixture likelihood ratio against `theta = 0` is

    Lambda_n = sqrt(V / (V + tau^2)) * exp(tau^2 * d^2 / (2 V (V + tau^2)))

Under the null `Lambda_n` is a (nonnegative) martingale, so by Ville's inequality
`P(Lambda_n >= 1/alpha for some n) <= alpha`: the always-valid p-value `min(1, 1/Lambda_n)` may be
checked after every event and the chance of EVER crossing alpha stays below alpha. (With the
variance estimated from the data rather than known, this holds asymptotically, as in Johari et al.)
The function is stateless and reports the current `1/Lambda_n`; a verdict can therefore go back to
"not significant" later, which is honest rather than a loss of validity.

Inverting the same test at every `theta` gives the matching confidence sequence: all `theta` whose
`Lambda_n(theta) < 1/alpha`, i.e. `d +- h` with

    h = sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))

It covers the true difference at all times simultaneously with probability >= 1 - alpha, and it
excludes 0 exactly when the p-value is <= alpha.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

METRICS = ("log_loss", "accuracy", "rmse", "mae")
# Probabilities are clipped before the log so that a confident mistake costs a large but finite
# loss (the same bound sklearn used for years).
_PROBABILITY_EPS = 1e-15
# tau^2 = this factor * the average within-arm variance, i.e. tau = 0.1 standard deviations of the
# per-row metric. The mixture then puts its weight on effects of about a tenth of a standard
# deviation, the size that separates two reasonable models of the same task, and the confidence
# sequence is tightest when V ~ tau^2 / 9 (minimising its width over tau), which with equal arms is
# n ~ 1,800 per arm: near the policy's default `min_outcomes` (1,000). Scaling by the metric's own
# variance makes the test unit-free, so one default fits log loss, accuracy and squared errors.
DEFAULT_TAU_VARIANCE_FACTOR = 0.01
# Added to empty bins (as a share) in PSI: without it one empty bin makes PSI infinite. 1e-4 is far
# below any share a 10-bin profile has on real data, yet it caps one emptied bin of share 0.1 at
# about 0.1 * ln(0.1 / 1e-4) ~ 0.7: an alarm, not an infinity.
PSI_EPSILON = 1e-4

Better = Literal["challenger", "champion"]


def higher_is_better(metric: str) -> bool:
    """Whether a larger `metric` is better (accuracy); losses and errors are lower-better."""
    _check_metric(metric)
    return metric == "accuracy"


def per_row_metric(metric: str, scores: np.ndarray, outcomes: np.ndarray) -> np.ndarray:
    """The metric per prediction, whose mean is the metric (for rmse: the squared error, so MSE).

    `scores`: P(positive) for binary classification, the prediction for regression; `outcomes`:
    0/1 or the observed value.
    """
    _check_metric(metric)
    p = np.asarray(scores, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"scores {p.shape} and outcomes {y.shape} must have the same shape")
    if metric == "log_loss":
        p = np.clip(p, _PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
        return -(y * np.log(p) + (1 - y) * np.log1p(-p))
    if metric == "accuracy":
        return ((p >= 0.5) == (y == 1)).astype(np.float64)
    if metric == "rmse":
        return (p - y) ** 2
    return np.abs(p - y)


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """One look at an A/B comparison: means, difference, always-valid interval and p-value.

    For rmse the means are mean squared errors. Means are None for an empty arm, the difference
    when either arm is empty, and the interval while the test cannot run yet (fewer than 2 values
    in an arm, or no variance at all).
    """

    metric: str
    n_champion: int
    n_challenger: int
    mean_champion: float | None
    mean_challenger: float | None
    difference: float | None  # challenger - champion
    ci_low: float | None  # confidence sequence at level 1 - alpha
    ci_high: float | None
    p_value: float  # always-valid
    significant: bool
    better: Better | None
    confidence: float  # 1 - p_value

    @property
    def n(self) -> int:
        """Values compared, both arms together."""
        return self.n_champion + self.n_challenger


def sequential_test(
    champion: np.ndarray,
    challenger: np.ndarray,
    *,
    metric: str,
    alpha: float = 0.05,
    tau: float | None = None,
) -> SequentialResult:
    """mSPRT of mean(challenger) - mean(champion) on per-row metric values, valid under peeking.

    `tau` is the standard deviation of the normal mixture over the difference; by default a tenth
    of the metric's standard deviation (see DEFAULT_TAU_VARIANCE_FACTOR). Non-finite values are
    ignored; with fewer than 2 values per arm or no variance the result is "not significant".
    """
    higher = higher_is_better(metric)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")
    a = _finite(champion)
    b = _finite(challenger)
    n_a, n_b = int(a.size), int(b.size)
    mean_a = float(a.mean()) if n_a else None
    mean_b = float(b.mean()) if n_b else None
    d = mean_b - mean_a if mean_a is not None and mean_b is not None else None
    undecided = SequentialResult(
        metric=metric,
        n_champion=n_a,
        n_challenger=n_b,
        mean_champion=mean_a,
        mean_challenger=mean_b,
        difference=d,
        ci_low=None,
        ci_high=None,
        p_value=1.0,
        significant=False,
        better=None,
        confidence=0.0,
    )
    if d is None or n_a < 2 or n_b < 2:
        return undecided
    var_a = float(a.var(ddof=1))
    var_b = float(b.var(ddof=1))
    v = var_a / n_a + var_b / n_b
    if not v > 0:
        return undecided
    tau2 = tau**2 if tau is not None else DEFAULT_TAU_VARIANCE_FACTOR * (var_a + var_b) / 2
    # In logs: Lambda overflows a float long before the evidence stops growing.
    log_lambda = 0.5 * math.log(v / (v + tau2)) + tau2 * d * d / (2 * v * (v + tau2))
    p_value = math.exp(-log_lambda) if log_lambda > 0 else 1.0
    half_width = math.sqrt(
        v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v))
    )
    significant = p_value <= alpha
    better: Better | None = None
    if significant:
        better = "challenger" if (d > 0) == higher else "champion"
    return SequentialResult(
        metric=metric,
        n_champion=n_a,
        n_challenger=n_b,
        mean_champion=mean_a,
        mean_challenger=mean_b,
        difference=d,
        ci_low=d - half_width,
        ci_high=d + half_width,
        p_value=p_value,
        significant=significant,
        better=better,
        confidence=min(1.0, max(0.0, 1.0 - p_value)),
    )


def verdict_text(result: SequentialResult, champion_name: str, challenger_name: str) -> str:
    """Plain-language verdict, e.g. "challenger better, 97% confidence, n = 41,200 (...)"."""
    # Variants are often named after their roles; "challenger challenger" reads badly.
    challenger = (
        "challenger" if challenger_name == "challenger" else f"challenger {challenger_name}"
    )
    champion = "champion" if champion_name == "champion" else f"champion {champion_name}"
    who = f"{challenger} vs. {champion}"
    if result.significant and result.better is not None:
        confidence = _percent(result.confidence)
        return f"{result.better} better, {confidence} confidence, n = {result.n:,} ({who})"
    return f"no significant difference yet (p = {result.p_value:.2g}, n = {result.n:,}; {who})"


def confidence_percent(confidence: float) -> str:
    """A confidence as the verdicts word it (rounded down: never more than the test gives)."""
    return _percent(confidence)


def _percent(confidence: float) -> str:
    # Rounded down, so a verdict never claims more confidence than the test gives (the 1e-9 only
    # keeps 0.97 from printing as 96% through binary rounding); past 99% one decimal keeps 99.0%
    # and 99.9% apart.
    if confidence < 0.99:
        return f"{math.floor(confidence * 100 + 1e-9)}%"
    return f"{min(99.9, math.floor(confidence * 1000 + 1e-9) / 10):.1f}%"


def build_profile(
    values: np.ndarray | Sequence[Any],
    kind: Literal["numeric", "category"],
    bins: int = 10,
) -> dict[str, Any]:
    """The training distribution of one feature, as stored in model_versions.feature_profile.

    numeric: `edges` are the inner quantiles (duplicates dropped, so ties give fewer bins); a value
    `x` falls in bin `i` when `edges[i-1] <= x < edges[i]`; category: the `bins` most frequent
    values, the last share being "other". Shares are over present values; `missing_share` is the
    share of NaN/None among all values.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    profile: dict[str, Any]
    if kind == "numeric":
        x = _as_float_array(values)
        missing = int(np.isnan(x).sum())
        finite = x[np.isfinite(x)]
        # Edges are data values ("higher" quantiles), never points between two of them: with
        # ties (0 x 90, 1 x 10) the edges are 0 and 1, not an interpolated 0.1 that splits nothing.
        quantiles = np.arange(1, bins) / bins
        edges = np.unique(np.quantile(finite, quantiles, method="higher")) if finite.size else []
        profile = {"kind": "numeric", "edges": [float(e) for e in edges]}
    elif kind == "category":
        keys = [_category_key(v) for v in values]
        missing = keys.count(None)
        frequency = Counter(k for k in keys if k is not None)
        # Most frequent first; ties by name so the same data always gives the same profile.
        top = sorted(frequency.items(), key=lambda item: (-item[1], item[0]))[:bins]
        profile = {"kind": "category", "categories": [k for k, _ in top]}
    else:
        raise ValueError(f"kind must be 'numeric' or 'category', got {kind!r}")
    counts = bin_counts(profile, values)
    total = sum(counts)
    profile["shares"] = [c / total if total else 0.0 for c in counts]
    size = len(values)
    profile["missing_share"] = missing / size if size else 0.0
    return profile


def bin_counts(profile: dict[str, Any], values: np.ndarray | Sequence[Any]) -> list[int]:
    """Counts of `values` in the profile's bins (len(profile["shares"])); NaN/None not counted.

    Numeric values that are not numbers are not counted either; unknown categories go to "other".
    """
    if profile.get("kind") == "category":
        index = {category: i for i, category in enumerate(profile["categories"])}
        other = len(index)
        counts = [0] * (other + 1)
        for value in values:
            key = _category_key(value)
            if key is not None:
                counts[index.get(key, other)] += 1
        return counts
    edges = np.asarray(profile["edges"], dtype=np.float64)
    x = _as_float_array(values)
    x = x[~np.isnan(x)]
    # side="right": a value equal to an edge belongs to the bin that edge opens.
    which = np.searchsorted(edges, x, side="right")
    return np.bincount(which, minlength=edges.size + 1).astype(int).tolist()


def psi(expected_shares: Sequence[float], actual_counts: Sequence[int]) -> float:
    """Population stability index sum((a - e) * ln(a / e)) over bins; 0.0 with no live values.

    Shares below PSI_EPSILON (empty bins) are raised to it, so PSI stays finite.
    """
    e, counts = _shares_and_counts(expected_shares, actual_counts)
    total = counts.sum()
    if total == 0:
        return 0.0
    a = np.maximum(counts / total, PSI_EPSILON)
    e = np.maximum(e, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(expected_shares: Sequence[float], actual_counts: Sequence[int]) -> float:
    """Kolmogorov-Smirnov distance over ordered bins (max |CDF difference|); 0.0 with no values."""
    e, counts = _shares_and_counts(expected_shares, actual_counts)
    total = counts.sum()
    if total == 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(e) - np.cumsum(counts / total))))


def auc(scores: np.ndarray, outcomes: np.ndarray) -> float | None:
    """ROC AUC of P(positive) scores against 0/1 outcomes; None when only one class is present.

    The Mann-Whitney form (ranks of the positives, ties averaged), equal to sklearn's
    `roc_auc_score` without its per-call validation (milliseconds on a dashboard's hot path).
    """
    y = np.asarray(outcomes, dtype=np.float64) == 1.0
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    rank_sum = float(ranks[y].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def quantile_from_histogram(
    counts: Sequence[int], upper_edges: Sequence[float], q: float
) -> float | None:
    """The q-quantile of a histogram, interpolated linearly inside its bin (as Prometheus does).

    `counts` has one bin per upper edge (the first starting at 0) plus optionally an overflow bin,
    which reports the last edge. None for an empty histogram.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if len(counts) not in (len(upper_edges), len(upper_edges) + 1) or not upper_edges:
        raise ValueError(
            f"{len(counts)} counts do not match {len(upper_edges)} upper edges (+1 overflow)"
        )
    # Plain Python: a few dozen bins, computed for every bucket of a series (numpy's per-call
    # overhead was most of a metrics request).
    total = float(sum(counts))
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    i = 0
    for i, count in enumerate(counts):  # noqa: B007 - i is the bin found
        cumulative += count
        # The first non-empty bin whose cumulative count reaches the rank.
        if count > 0 and cumulative >= rank:
            break
    if i >= len(upper_edges):
        return float(upper_edges[-1])
    lower = float(upper_edges[i - 1]) if i > 0 else 0.0
    upper = float(upper_edges[i])
    before = cumulative - counts[i]
    return lower + (upper - lower) * float((rank - before) / counts[i])


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def _finite(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def _as_float_array(values: np.ndarray | Sequence[Any]) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        # Live events can carry anything; what is not a number counts as missing, not a crash.
        return np.asarray([_to_float(v) for v in values], dtype=np.float64)


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _category_key(value: Any) -> str | None:
    # Categories are compared as strings, so numpy scalars from training data, JSON values from
    # live events, and 1 vs. 1.0 all meet the same key.
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def _shares_and_counts(
    expected_shares: Sequence[float], actual_counts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(expected_shares, dtype=np.float64)
    counts = np.asarray(actual_counts, dtype=np.float64)
    if e.shape != counts.shape or e.ndim != 1:
        raise ValueError(f"{counts.size} actual counts do not match {e.size} expected shares")
    return e, counts
