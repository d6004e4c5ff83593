"""Prometheus metrics of a scorer process (served on /metrics by scoring.http)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

EVENTS_IN = Counter("carrara_scorer_events_in_total", "Input events consumed", ["deployment"])
PREDICTIONS = Counter(
    "carrara_scorer_predictions_total",
    "Predictions written",
    ["deployment", "variant", "shadow"],
)
DEAD_LETTERS = Counter(
    "carrara_scorer_dead_letters_total",
    "Events sent to the dead-letter topic",
    ["deployment", "error_class"],
)
KEYLESS = Counter(
    "carrara_scorer_keyless_events_total",
    "Events without an entity key (split by offset)",
    ["deployment"],
)
BATCH_SECONDS = Histogram(
    "carrara_scorer_batch_seconds",
    "Time to score and deliver one micro-batch",
    ["deployment"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
MODEL_LOAD_SECONDS = Gauge(
    "carrara_scorer_model_load_seconds",
    "Time to load and validate a model version",
    ["model", "version", "runtime"],
)
CONSUMER_LAG = Gauge(
    "carrara_scorer_consumer_lag",
    "Messages behind the end of each assigned partition",
    ["deployment", "partition"],
)
REVISION = Gauge("carrara_scorer_revision", "Deployment revision being served", ["deployment"])
REJECTED_RECORDS = Counter(
    "carrara_scorer_rejected_records_total",
    "Deployment records refused (key is not the deployment name, unsigned, bad signature)",
    ["reason"],
)
LAST_BATCH_AGE = Gauge(
    "carrara_scorer_last_batch_age_seconds",
    "Seconds since the deployment's loop last committed a batch or confirmed it had nothing to do",
    ["deployment"],
)

FEATURE_STATE_KEYS = Gauge(
    "carrara_scorer_feature_state_keys",
    "Entity keys held in a feature set's state, per input partition",
    ["deployment", "feature_set", "partition"],
)
FEATURE_STATE_BYTES = Gauge(
    "carrara_scorer_feature_state_bytes",
    "Serialised size of a feature set's state (what the changelog holds), per input partition",
    ["deployment", "feature_set", "partition"],
)
FEATURE_RESTORE_SECONDS = Histogram(
    "carrara_scorer_feature_restore_seconds",
    "Time to restore a partition's feature state from its changelog",
    ["deployment", "feature_set"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
FEATURE_CHANGELOG_RECORDS = Counter(
    "carrara_scorer_feature_changelog_records_total",
    "State changes written to feature-set changelogs (tombstones included)",
    ["deployment", "feature_set"],
)


class EndToEndLatency(Collector):
    """Per-variant histogram of "input record timestamp -> prediction committed", in seconds.

    A batch's events are added in one vectorised pass (a Prometheus `Histogram.observe` per event
    would cost more than scoring it).
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5, 10)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bounds = np.asarray(self.BUCKETS) * 1000  # ms
        self._data: dict[tuple[str, str], tuple[np.ndarray, list[float]]] = {}

    def observe_ms(
        self, deployment: str, variant: str, now_ms: float, timestamps: Sequence[int]
    ) -> None:
        if not timestamps:
            return
        latencies = np.maximum(now_ms - np.asarray(timestamps, dtype=np.float64), 0.0)
        counts = np.bincount(
            np.searchsorted(self._bounds, latencies, side="left"), minlength=len(self._bounds) + 1
        )
        with self._lock:
            current = self._data.get((deployment, variant))
            if current is None:
                current = self._data[(deployment, variant)] = (
                    np.zeros(len(self._bounds) + 1, dtype=np.int64),
                    [0.0],
                )
            current[0][:] += counts
            current[1][0] += float(latencies.sum()) / 1000

    def forget(self, deployment: str) -> None:
        with self._lock:
            for key in [k for k in self._data if k[0] == deployment]:
                del self._data[key]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "carrara_scorer_end_to_end_seconds",
            "Input record timestamp to prediction committed (read_committed visible), per variant",
            labels=["deployment", "variant"],
        )
        with self._lock:
            items = [(k, c.copy(), total[0]) for k, (c, total) in self._data.items()]
        for (deployment, variant), counts, total in items:
            cumulative = np.cumsum(counts).tolist()
            buckets = [(str(b), float(c)) for b, c in zip(self.BUCKETS, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([deployment, variant], buckets, total)
        yield family


END_TO_END = EndToEndLatency()
REGISTRY.register(END_TO_END)

_PER_DEPLOYMENT = (
    EVENTS_IN,
    PREDICTIONS,
    DEAD_LETTERS,
    KEYLESS,
    BATCH_SECONDS,
    CONSUMER_LAG,
    REVISION,
    LAST_BATCH_AGE,
    FEATURE_STATE_KEYS,
    FEATURE_STATE_BYTES,
    FEATURE_RESTORE_SECONDS,
    FEATURE_CHANGELOG_RECORDS,
)


def forget_deployment(deployment: str) -> None:
    """Remove a stopped deployment's series, so /metrics does not report it forever."""
    for metric in _PER_DEPLOYMENT:
        metric.remove_by_labels({"deployment": deployment})
    END_TO_END.forget(deployment)
