"""Prometheus metrics of a scorer process (served on /metrics by scoring.http)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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

_PER_DEPLOYMENT = (
    EVENTS_IN,
    PREDICTIONS,
    DEAD_LETTERS,
    KEYLESS,
    BATCH_SECONDS,
    CONSUMER_LAG,
    REVISION,
    LAST_BATCH_AGE,
)


def forget_deployment(deployment: str) -> None:
    """Remove a stopped deployment's series, so /metrics does not report it forever."""
    for metric in _PER_DEPLOYMENT:
        metric.remove_by_labels({"deployment": deployment})
